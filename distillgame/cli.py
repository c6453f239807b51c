"""The ``distillgame`` command line.

Each area of the project registers its own subcommands in a ``cli`` module of
its package (``register(subparsers)``), so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands; each defines register(subparsers).
COMMAND_MODULES = (
    "distillgame.plugins.cli",  # generate, ads-grad
    "distillgame.server.cli",  # serve
    "distillgame.tasks_cli",  # eval, zoo
    "distillgame.clients.cli",  # attack
    "distillgame.bench.cli",  # bench
    "distillgame.check",  # check --gpu
    "distillgame.compare",  # compare
    "distillgame.models",  # models teacher|proxy
    "distillgame.proxy_cli",  # proxy
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillgame", description="A defended LLM inference server and its attack harness."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
