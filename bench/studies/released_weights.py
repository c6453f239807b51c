"""Study: what the released adaptive protocol's weights follow on a trace collection.

For: reading one ``attack values`` output (or a distill run's ``values.jsonl``)
next to the traces it scored, and reporting the weights' spread (ESS, the share
of clipped values, the mass of the top fifth) and what they track: the trace's
correctness and its length (Spearman rank correlations with the value a).
This is the evidence behind the adaptive-controls discussion; it trains nothing.

Not for: computing values (``distillgame attack values``) or training.

Reproduce (zoo, undefended collection of ``bench/adaptive_controls.py``)::

    distillgame attack values --student bench/zoo/student-base --traces /tmp/controls/none/traces.jsonl \\
        --val-traces /tmp/controls/none/val_traces.jsonl --weighting released --rank 64 --batch-size 6 \\
        --max-length 512 --seed 0 --out /tmp/values_zoo.jsonl
    python bench/studies/released_weights.py --values /tmp/values_zoo.jsonl --traces /tmp/controls/none/traces.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def study(values: Path, traces: Path, clip: float = 10.0) -> dict:
    from distillgame.clients.attack.collect import read_records
    from distillgame.clients.attack.weights import effective_sample_size

    records = read_records(traces)
    rows = [json.loads(x) for x in values.read_text().splitlines()]
    a = [r["value"] for r in rows]
    w = torch.tensor([r["weight"] for r in rows], dtype=torch.float64)
    correct = [float(bool(records[r["id"]].get("correct"))) for r in rows]
    length = [float((records[r["id"]].get("usage") or {}).get("completion_tokens") or len(records[r["id"]]["completion"]))
              for r in rows]
    right = [float(wi) for wi, c in zip(w, correct) if c]
    wrong = [float(wi) for wi, c in zip(w, correct) if not c]
    top = w.sort(descending=True).values[: max(1, len(w) // 5)]
    n_clip_low = sum(ai <= -clip for ai in a)
    n_clip_high = sum(ai >= clip for ai in a)
    return {
        "n": len(rows),
        "a_mean": sum(a) / len(a),
        "a_min": min(a),
        "a_max": max(a),
        "frac_clipped_low": n_clip_low / len(a),
        "frac_clipped_high": n_clip_high / len(a),
        "ess_frac": effective_sample_size(w) / len(w),
        "frac_mass_top20": float(top.sum() / w.sum()),
        "trace_accuracy": sum(correct) / len(correct),
        "mean_w_correct": sum(right) / max(1, len(right)),
        "mean_w_wrong": sum(wrong) / max(1, len(wrong)),
        "spearman_a_correct": spearman(a, correct),
        "spearman_a_length": spearman(a, length),
        # Many values sit at the clip (tied weights), so the traces are split there, not by rank.
        "accuracy_clipped_low": _mean([c for ai, c in zip(a, correct) if ai <= -clip]),
        "accuracy_unclipped": _mean([c for ai, c in zip(a, correct) if -clip < ai < clip]),
        "accuracy_top50_by_weight": _mean([c for _, c in sorted(zip(w.tolist(), correct), key=lambda t: -t[0])[:50]]),
        "mass_top20_traces": float(w.sort(descending=True).values[:20].sum() / w.sum()),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", type=Path, required=True)
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--clip", type=float, default=10.0)
    args = p.parse_args(argv)
    json.dump(study(args.values, args.traces, args.clip), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
