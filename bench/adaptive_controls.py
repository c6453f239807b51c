"""Controls for the adaptive student: is its weighting information or noise, and which sign helps?

On one collection of undefended zoo traces, trains students that differ only in
their weights (same traces, data order, seed, steps), scores each on the test
split, and writes JSON and Markdown:

- ``passive``: uniform weights;
- ``released`` / ``released-neg``: the authors' released protocol (fixed
  weights ``exp(beta clip(a))`` from theta_0, L_val on the undefended teacher's
  validation traces), with its own sign and negated;
- ``minibatch`` / ``minibatch-neg``: eq. 3 tilted per minibatch under the KL
  budget rho (the paper's text), with its own sign and negated;
- ``released-kl``: the released values with beta set so that the weights spend
  a KL budget of 0.1 over the whole set (eq. 2) instead of beta = 0.5;
- ``placebo``: the released weights shuffled over the training set (same
  spread and ESS, no information about which trace gets which weight);
- ``placebo-minibatch`` (on request): the minibatch weights shuffled within each batch.

Each released run also reports its weights' spread: the effective sample size
``ESS = (sum w)^2 / sum w^2``, the share of clipped values, and the mean weight
of traces whose answer is right against those whose answer is wrong.

``--student pretrained`` swaps the zoo's from-scratch student for a pretrained
one (SmolLM2-135M-Instruct, the embedded teacher, from ``distillgame.models``)
in the paper's regime: LoRA, 3 epochs, lr 5e-4.

Usage: python -m distillgame.bench.adaptive_controls --work /tmp/controls --out bench/results/adaptive_controls.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from distillgame.bench.trace_cost import write_report
from distillgame.clients.attack.table import Server, Setting, TableConfig, collect_setting, eval_student, mean_sem

VARIANTS: dict[str, dict[str, Any]] = {
    "passive": dict(mode="passive"),
    "released": dict(mode="adaptive", weighting="released"),
    "released-neg": dict(mode="adaptive", weighting="released", value_sign=-1),
    "released-kl": dict(mode="adaptive", weighting="released", beta_rho=0.1),
    "placebo": dict(mode="adaptive", weighting="released", placebo=True),
    "minibatch": dict(mode="adaptive", weighting="minibatch"),
    "minibatch-neg": dict(mode="adaptive", weighting="minibatch", value_sign=-1),
    "placebo-minibatch": dict(mode="adaptive", weighting="minibatch", placebo=True),
}
DEFAULT = ["passive", "released", "released-neg", "released-kl", "placebo", "minibatch", "minibatch-neg"]
WHAT = {
    "passive": "uniform",
    "released": "exp(beta clip(a)), a = -dNLL_i along g at theta_0, fixed",
    "released-neg": "the same with a negated",
    "released-kl": "released, beta set for KL(w ‖ uniform) = 0.1 over the set",
    "placebo": "the released weights shuffled over the set",
    "minibatch": "exp(eta v) per minibatch, v from eq. 3, KL rho",
    "minibatch-neg": "the same with v negated",
    "placebo-minibatch": "the minibatch weights shuffled in the batch",
}


def train_and_score(cfg: TableConfig, name: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    import torch

    from distillgame.clients.attack.distill import DistillConfig, distill

    torch.set_num_threads(cfg.threads)
    run = cfg.work / overrides.get("tag", "") / f"{name}-seed{seed}"
    traces = Path(overrides.get("traces", cfg.work / "none" / "traces.jsonl"))
    if not (run / "summary.json").exists():
        opts = {k: v for k, v in overrides.items() if k not in ("tag", "traces")}
        dcfg = DistillConfig(student=cfg.student, out=run, rho=cfg.rho, val_every=cfg.val_every, rank=cfg.rank,
                             lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                             max_length=cfg.max_length, seed=seed, beta=cfg.beta, fd_eps=cfg.fd_eps, clip=cfg.clip,
                             **{**VARIANTS[name], **opts})
        released = dcfg.mode == "adaptive" and dcfg.weighting == "released"
        distill(dcfg, traces, val_task=cfg.task, val_split="validation",
                val_n=cfg.n_val, val_traces=cfg.work / "none" / "val_traces.jsonl" if released else None)
    acc = eval_student(str(run / "merged"), cfg, run / "eval")
    return {"acc": acc, **weight_report(run, traces)}


def weight_report(run: Path, traces: Path) -> dict[str, Any]:
    """The spread of a run's weights, and how they split between right and wrong traces."""
    summary = json.loads((run / "summary.json").read_text())
    out: dict[str, Any] = {}
    if (run / "values.jsonl").exists():
        from distillgame.clients.attack.collect import read_records

        correct = {k: bool(r.get("correct")) for k, r in read_records(traces).items()}
        rows = [json.loads(x) for x in (run / "values.jsonl").read_text().splitlines()]
        right = [r["weight"] for r in rows if correct.get(r["id"])]
        wrong = [r["weight"] for r in rows if not correct.get(r["id"])]
        out["weights"] = {**(summary.get("weights") or {}),
                          "mean_w_correct": sum(right) / len(right) if right else None,
                          "mean_w_wrong": sum(wrong) / len(wrong) if wrong else None}
    log_rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    ess = [e for row in log_rows for e in row.get("ess", [])]
    if ess:
        out["minibatch_ess_mean"] = sum(ess) / len(ess)
    return out


def pretrained_student() -> str:
    from distillgame.models import default_teacher

    return str(default_teacher())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="traces and students (a rerun reuses them)")
    p.add_argument("--out", type=Path, default=Path("bench/results/adaptive_controls.json"))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--student", default="zoo", help='"zoo" (from scratch, the table defaults), "pretrained" '
                                                   "(SmolLM2-135M-Instruct: LoRA, 3 epochs, lr 5e-4) or a folder")
    p.add_argument("--beta", type=float, default=None, help="released protocol's beta (default 0.5)")
    p.add_argument("--serve-dtype", default=None, help="teacher dtype for the collection server (e.g. float32)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None, help="training epochs (default: the table's, 60 for the zoo)")
    p.add_argument("--value-dtype", default="float64", help="released protocol: dtype of the perturbed copies")
    p.add_argument("--n-test", type=int, default=None, help="test problems per student (default: the table's, 500)")
    p.add_argument("--n-train", type=int, default=None,
                   help="distill on the first N traces of the collection (default: all of them)")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    cfg = TableConfig(out=args.out.parent, work=args.work)
    tag = ""
    if args.student != "zoo":
        # The paper's regime for a pretrained student (DistillConfig's defaults but rank).
        cfg.student = pretrained_student() if args.student == "pretrained" else args.student
        cfg.epochs, cfg.lr = 3.0, 5e-4
        tag = "pretrained" if args.student == "pretrained" else Path(args.student).name
    if args.beta is not None:
        cfg.beta = args.beta
        tag = f"{tag}-beta{args.beta:g}".strip("-")
    if args.workers:
        cfg.workers = args.workers
    if args.n_test:
        cfg.n_test = args.n_test
    if args.epochs is not None and args.epochs != cfg.epochs:
        cfg.epochs = args.epochs
        tag = f"{tag}-epochs{args.epochs:g}".strip("-")
    if args.serve_dtype:
        cfg.serve_args = [*cfg.serve_args, "--dtype", args.serve_dtype]
    cfg.work.mkdir(parents=True, exist_ok=True)
    none = Setting("none", {"mode": "none"})
    if not all((cfg.work / "none" / f).exists() for f in ("traces.jsonl.summary.json", "val_traces.jsonl.summary.json")):
        server = Server(cfg, [none])
        try:
            collect_setting(cfg, none, server.base_url, server.keys["none"])
        finally:
            server.close()
    # In the order given (the minibatch students, with per-example gradients every step, last by
    # default: a run cut short still has the cheap controls), cfg.workers students at a time.
    overrides: dict[str, Any] = {"tag": tag, "value_dtype": args.value_dtype}
    if args.n_train is not None and args.n_train < cfg.n_train:
        # A prefix of the same collection (problems in collection order): fewer steps, same traces.
        cfg.n_train = args.n_train
        overrides["tag"] = f"{tag}-n{args.n_train}".strip("-")
        overrides["traces"] = subset = cfg.work / "none" / f"traces.first{args.n_train}.jsonl"
        lines = (cfg.work / "none" / "traces.jsonl").read_text().splitlines(keepends=True)[:args.n_train]
        subset.write_text("".join(lines))
    jobs = [(n, s) for s in range(args.seeds) for n in names]
    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
        futures = {ex.submit(train_and_score, cfg, n, s, overrides): (n, s) for n, s in jobs}
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            print(f"{futures[fut]}: {results[futures[fut]]['acc']:.3f}", flush=True)
            # A report after every student: a long run stopped early still leaves one.
            report(args, argv, cfg, names, results, Path(overrides.get("traces", cfg.work / "none" / "traces.jsonl")))
    return 0


def report(args: argparse.Namespace, argv: list[str] | None, cfg: TableConfig, names: list[str],
           results: dict[tuple[str, int], dict[str, Any]], traces_file: Path) -> None:
    rows = {}
    for n in names:
        runs = [results[(n, s)] for s in range(args.seeds) if (n, s) in results]
        if not runs:
            continue
        rows[n] = {"runs": [r["acc"] for r in runs], **mean_sem([r["acc"] for r in runs]),
                   "weights": [r.get("weights") for r in runs], "minibatch_ess_mean": [r.get("minibatch_ess_mean")
                                                                                      for r in runs],
                   **VARIANTS[n]}
    command = "python -m distillgame.bench.adaptive_controls " + " ".join(sys.argv[1:] if argv is None else argv)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
              if k in ("teacher", "student", "task", "n_train", "n_test", "n_val", "n_val_traces", "rank", "lr",
                       "epochs", "batch_size", "grad_accum", "max_length", "rho", "val_every", "beta", "fd_eps",
                       "clip")}
    from distillgame.clients.attack.collect import read_records

    records = read_records(traces_file).values()
    traces = {"accuracy": sum(bool(r.get("correct")) for r in records) / max(1, len(records))}
    result = {"command": command, "seeds": args.seeds, "config": config, "trace_accuracy": traces["accuracy"],
              "variants": rows}
    B = cfg.batch_size
    lines = [f"# Adaptive-student controls (undefended zoo traces, student: {args.student})", "",
             f"Command: `{command}`", "",
             f"Same traces, data order, seed and steps; only the weights differ. {cfg.n_train} traces "
             f"({traces['accuracy']:.1%} correct), {cfg.epochs:g} epochs at lr {cfg.lr:g}, LoRA rank {cfg.rank}, "
             f"{cfg.n_test} test problems, seeds: {args.seeds}; "
             f"released: beta {cfg.beta}, eps {cfg.fd_eps}, clip {cfg.clip}, L_val on {cfg.n_val_traces} undefended "
             f"validation traces; minibatch: rho {cfg.rho}.", "",
             "| student | weights | test accuracy (per seed) | mean ± s.e. | ESS / N | mean w (right / wrong traces) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, r in rows.items():
        w = r["weights"][0]
        if w:
            ess = f"{w['ess_frac']:.2f}"
            split = f"{w['mean_w_correct']:.2f} / {w['mean_w_wrong']:.2f}" if w["mean_w_wrong"] is not None else "n/a"
        elif r["minibatch_ess_mean"][0] is not None and r["mode"] == "adaptive":
            ess, split = f"{r['minibatch_ess_mean'][0] / B:.2f} (per batch)", "n/a"
        else:
            ess, split = "1.00", "1.00 / 1.00"
        # One seed: the test split's binomial s.e. (the seed-to-seed spread is not measured).
        sem = (f" ± {r['sem']:.1%}" if r["n"] > 1
               else f" ± {math.sqrt(r['mean'] * (1 - r['mean']) / cfg.n_test):.1%} (binomial)")
        lines.append(f"| {n} | {WHAT[n]} | {', '.join(f'{a:.1%}' for a in r['runs'])} | {r['mean']:.1%}{sem} | "
                     f"{ess} | {split} |")
    lines += ["", "ESS / N: effective sample size (sum w)^2 / sum w^2 over the training set (minibatch: per batch "
              f"of {B}), as a share of the examples."]
    lines += ["", f"Done: {len(results)} of {len(names) * args.seeds} students."]
    write_report(args.out, result, lines)


if __name__ == "__main__":
    raise SystemExit(main())
