"""Time cost of generating attack traces per teacher setting, measured side by side.

``attack table`` reports a time cost from each setting's own collection; when
collections run at different times (a resumed table, other jobs on the machine)
that column compares different conditions. This script measures the same
quantity under one set of conditions: one server with a key per setting, the
settings interleaved round by round on the same train prompts, concurrency and
token limit as the table. Writes JSON and Markdown.

Usage: python -m distillgame.bench.trace_cost --rounds 3 --n 200 --out bench/results/trace_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distillgame.bench.overhead import machine_info
from distillgame.clients.attack.collect import CollectConfig, collect
from distillgame.clients.attack.table import Server, TableConfig, parse_settings


def measure(cfg: TableConfig, rounds: int, n: int, work: Path) -> dict[str, dict]:
    settings = cfg.all_settings()
    totals = {s.name: {"label": s.label, "wall_s": 0.0, "latency_s_sum": 0.0, "completion_tokens": 0} for s in settings}
    server = Server(cfg, settings)
    try:
        for rnd in range(rounds):
            for s in settings:  # interleaved: drift hits every setting alike
                t0 = time.perf_counter()
                summary = collect(CollectConfig(
                    split="train", n=n, out=work / f"{s.name}-round{rnd}.jsonl", temperature=cfg.temperature,
                    seed=rnd, base_url=server.base_url, api_key=server.keys[s.name], model="teacher",
                    task=cfg.task, max_tokens=cfg.max_tokens, concurrency=cfg.concurrency))
                totals[s.name]["wall_s"] += time.perf_counter() - t0
                totals[s.name]["latency_s_sum"] += summary["latency_s_sum"]
                totals[s.name]["completion_tokens"] += summary["completion_tokens"]
    finally:
        server.close()
    base = totals["none"]
    for row in totals.values():
        row["time_cost"] = row["wall_s"] / base["wall_s"]
        row["time_cost_latency"] = row["latency_s_sum"] / base["latency_s_sum"]
        row["time_cost_per_token"] = (row["wall_s"] / row["completion_tokens"]) / (
            base["wall_s"] / base["completion_tokens"])
    return totals


def write_report(out: Path, result: dict, lines: list[str]) -> None:
    """``out`` (JSON) and the Markdown ``lines`` next to it (same stem, .md), echoed to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=None, help='as in attack table, e.g. "none;poe:gamma=0.65"')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=200, help="train prompts per setting and round")
    p.add_argument("--out", type=Path, default=Path("bench/results/trace_cost.json"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="distillgame-trace-cost-") as tmp:
        kw = {"settings": parse_settings(args.settings)} if args.settings else {}
        cfg = TableConfig(out=Path(tmp), work=Path(tmp), **kw)
        rows = measure(cfg, args.rounds, args.n, Path(tmp))
    command = "python -m distillgame.bench.trace_cost " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "rounds": args.rounds, "n": args.n, "task": cfg.task,
              "concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens, "teacher": cfg.teacher,
              "proxy": cfg.proxy, "machine": machine_info(), "settings": rows}
    lines = ["# Time cost of trace generation, settings interleaved in one server", "",
             f"Command: `{command}`", "",
             f"{args.rounds} rounds x {args.n} {cfg.task} train prompts per setting, concurrency "
             f"{cfg.concurrency}, max {cfg.max_tokens} tokens, temperature {cfg.temperature}.", "",
             "| setting | wall s | tokens | time cost (wall) | per token | summed latency |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} | {r['completion_tokens']} | {r['time_cost']:.2f}x | "
                     f"{r['time_cost_per_token']:.2f}x | {r['time_cost_latency']:.2f}x |")
    write_report(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
