"""``distillgame eval`` and ``distillgame zoo build|eval``.

Not for: the logic itself (``distillgame.evaluate``, ``distillgame.bench.zoo.build``).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ZOO_MODELS = ("teacher", "proxy", "student-base")


def _eval(args: argparse.Namespace) -> int:
    from distillgame.evaluate import evaluate

    defense = json.loads(args.defense) if args.defense else None
    engine_opts = {"proxy": args.proxy} if defense is not None and args.proxy else {}
    summary = evaluate(
        args.model,
        args.task,
        args.split,
        args.n,
        Path(args.out),
        max_tokens=args.max_tokens,
        chat=args.chat,
        data_dir=args.data_dir,
        defense=defense,
        max_model_len=args.max_model_len,
        memory_share=args.memory_share,
        **engine_opts,
    )
    sys.stdout.write(json.dumps({k: summary[k] for k in ("accuracy", "correct", "n")}) + "\n")
    return 0


def zoo_eval(zoo_dir: Path, n: int, split: str = "test", task: str = "gsm-symbolic-easy") -> dict:
    """Evaluate every zoo model through ``distillgame eval`` (one engine at a time,
    each in its own process) and write ``results.json``, ``results.md`` and a PNG."""
    results: dict[str, dict] = {}
    for name in ZOO_MODELS:
        out = zoo_dir / "eval" / name
        cmd = [sys.executable, "-m", "distillgame.cli", "eval", "--model", str(zoo_dir / name), "--task", task,
               "--split", split, "--n", str(n), "--out", str(out), "--max-tokens", "160"]
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        results[name] = json.loads((out / "summary.json").read_text())
    table = {name: {k: results[name][k] for k in ("accuracy", "correct", "n", "problems_digest")} for name in results}
    (zoo_dir / "results.json").write_text(json.dumps({"task": task, "split": split, "models": table}, indent=2))
    lines = [f"| model | accuracy on {task} {split} | correct / n |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['correct']} / {v['n']} |" for k, v in table.items()]
    (zoo_dir / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(table), [v["accuracy"] for v in table.values()], color=["#1f77b4", "#ff7f0e", "#2ca02c"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"zoo on {task} {split} (n={n})")
    fig.tight_layout()
    fig.savefig(zoo_dir / "results.png", dpi=120)
    return table


def _zoo(args: argparse.Namespace) -> int:
    from distillgame.bench.zoo.build import ZOO_DIR, ZooConfig, build_zoo

    out = Path(args.out) if args.out else ZOO_DIR
    if args.action == "build":
        cfg = ZooConfig(out_dir=out, seed=args.seed, threads=args.threads)
        if args.scale != 1.0:
            cfg = cfg.scaled(args.scale)
        only = tuple(args.only.split(",")) if args.only else ZOO_MODELS
        build_zoo(cfg, only=only)
        if args.no_eval:
            return 0
    table = zoo_eval(out, args.n)
    sys.stdout.write(json.dumps(table, indent=2) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy of a model on a task split (vLLM, greedy)")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--task", default="gsm-symbolic-easy", help="gsm-symbolic, gsm-symbolic-easy, gsm8k, math or jsonl:FILE")
    p.add_argument("--split", default="test", choices=["train", "holdout", "validation", "test"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", required=True, help="folder for results.jsonl and summary.json")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--chat", action="store_true", help="use the model's chat template (instruct models)")
    p.add_argument("--data-dir", default=None, help="local {train,test}.jsonl for gsm8k/math instead of the hub")
    p.add_argument("--defense", default=None, help='JSON defense dict, e.g. \'{"mode": "poe", "gamma": 0.65}\'')
    p.add_argument("--proxy", default=None, help="proxy folder for --defense (default: the embedded one)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's own context length")
    p.add_argument("--memory-share", type=float, default=0.1)
    p.set_defaults(func=_eval)

    z = subparsers.add_parser("zoo", help="rebuild or evaluate the CPU-scale model zoo")
    z.add_argument("action", choices=["build", "eval"])
    z.add_argument("--out", default=None, help="zoo folder (default: bench/zoo)")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--threads", type=int, default=1)
    z.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (smoke runs)")
    z.add_argument("--only", default=None, help="comma-separated subset of teacher,proxy,student-base")
    z.add_argument("--n", type=int, default=500, help="test problems per model for the report")
    z.add_argument("--no-eval", action="store_true")
    z.set_defaults(func=_zoo)
