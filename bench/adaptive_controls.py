"""Controls for the adaptive student: is its tilt information or noise?

On one collection of undefended zoo traces, trains students that differ only in
their minibatch weights (same data order, seed, steps), scores each on the test
split, and writes JSON and Markdown:

- ``passive``: uniform weights;
- ``adaptive``: ``w ∝ exp(eta v)`` with v from eq. 3 (summed log p(y|x)), KL budget rho;
- ``adaptive-mean``: the same with v from the per-token mean log-likelihood;
- ``placebo``: the adaptive weights shuffled within each minibatch (same spread,
  same KL, no information about which trace gets which weight).

If the adaptive student beats the placebo, its values carry information; if it
trails the passive one by about as much as the placebo does, the cost is the
noise of reweighting. Uses ``attack table``'s defaults (zoo, 1000 traces,
rank 64, lr 5e-3, 20 epochs).

Usage: python -m distillgame.bench.adaptive_controls --work /tmp/controls --out bench/results/adaptive_controls.json
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from distillgame.bench.trace_cost import write_report
from distillgame.clients.attack.table import Server, Setting, TableConfig, collect_setting, eval_student

VARIANTS = {
    "passive": dict(mode="passive"),
    "adaptive": dict(mode="adaptive", value_norm="sum"),
    "adaptive-mean": dict(mode="adaptive", value_norm="mean"),
    "placebo": dict(mode="adaptive", value_norm="sum", placebo=True),
}


def train_and_score(cfg: TableConfig, name: str, seed: int) -> float:
    import torch

    from distillgame.clients.attack.distill import DistillConfig, distill

    torch.set_num_threads(cfg.threads)
    run = cfg.work / f"{name}-seed{seed}"
    if not (run / "summary.json").exists():
        dcfg = DistillConfig(student=cfg.student, out=run, rho=cfg.rho, val_every=cfg.val_every, rank=cfg.rank,
                             lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                             max_length=cfg.max_length, seed=seed, **VARIANTS[name])
        distill(dcfg, cfg.work / "none" / "traces.jsonl", val_task=cfg.task, val_split="validation", val_n=cfg.n_val)
    return eval_student(str(run / "merged"), cfg, run / "eval")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="traces and students (a rerun reuses them)")
    p.add_argument("--out", type=Path, default=Path("bench/results/adaptive_controls.json"))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    cfg = TableConfig(out=args.out.parent, work=args.work)
    cfg.work.mkdir(parents=True, exist_ok=True)
    none = Setting("none", {"mode": "none"})
    if not (cfg.work / "none" / "traces.jsonl.summary.json").exists():
        server = Server(cfg, [none])
        try:
            collect_setting(cfg, none, server.base_url, server.keys["none"])
        finally:
            server.close()
    # Slowest first (adaptive variants), cfg.workers students at a time.
    jobs = [(n, s) for s in range(args.seeds) for n in sorted(names, key=lambda n: n == "passive")]
    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
        futures = {job: ex.submit(train_and_score, cfg, *job) for job in jobs}
        accs = {job: f.result() for job, f in futures.items()}

    rows = {}
    for n in names:
        runs = [accs[(n, s)] for s in range(args.seeds)]
        rows[n] = {"runs": runs, "mean": sum(runs) / len(runs), **VARIANTS[n]}
    command = "python -m distillgame.bench.adaptive_controls " + " ".join(sys.argv[1:] if argv is None else argv)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
              if k in ("teacher", "student", "task", "n_train", "n_test", "n_val", "rank", "lr", "epochs",
                       "batch_size", "grad_accum", "max_length", "rho", "val_every")}
    result = {"command": command, "seeds": args.seeds, "config": config, "variants": rows}
    lines = ["# Adaptive-student controls (undefended zoo traces)", "", f"Command: `{command}`", "",
             f"Same traces, data order, seed and steps; only the minibatch weights differ. rho = {cfg.rho}, "
             f"{cfg.n_test} test problems, seeds: {args.seeds}.", "",
             "| student | weights | test accuracy (per seed) | mean |", "| --- | --- | --- | --- |"]
    what = {"passive": "uniform", "adaptive": "exp(eta v), v from summed log p (eq. 3)",
            "adaptive-mean": "exp(eta v), v from mean token log p", "placebo": "adaptive weights, shuffled in the batch"}
    for n, r in rows.items():
        lines.append(f"| {n} | {what[n]} | {', '.join(f'{a:.1%}' for a in r['runs'])} | {r['mean']:.1%} |")
    write_report(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
