"""Where a PoE engine step goes on the vLLM-layer proxy path: a torch profile, per part.

Starts one engine per proxy runner (the embedded pair by default; ``vllm-separate``
is the vllm runner with the shared trunk off, so an early-exit proxy runs its own layers) with vLLM's
torch profiler on, warms it up, and profiles ``--tokens`` decode steps of a
batch of ``--batch`` PoE requests. The defended model and the processor label
their parts (``record_function``): ``distillgame.teacher_forward``,
``distillgame.proxy_forward``, ``distillgame.hidden_concat``,
``distillgame.teacher_logits``, ``distillgame.defense_apply`` (the
processor: on the transformers runner it includes that runner's proxy
forward) and, inside it, ``distillgame.proxy_logits`` (the proxy's head on the
PoE rows). The table is read from the profile
trace vLLM writes: the median duration of each label, of vLLM's decode-only
model step (``execute_context_0(0)_generation_*``) and of its sampler (which
runs the logits processors), i.e. per decode step.

Usage: python -m distillgame.bench.step_profile --out bench/results
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillgame.bench.overhead import add_pair_arguments, axes, machine_info, save_figure, write_results

# In the model step, then in the sampler (the proxy's head runs inside the processor, on its PoE rows).
LABELS = ["distillgame.teacher_forward", "distillgame.proxy_forward", "distillgame.hidden_concat",
          "distillgame.teacher_logits", "distillgame.defense_apply", "distillgame.proxy_logits"]
# vLLM's own annotations: a decode-only model step, and the sampler (where logits processors run).
DECODE_STEP = "execute_context_0(0)_generation_"
SAMPLER = "nn.Module: Sampler_0"


def parse_trace(events: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per call of each part, over a profile's Chrome-trace events (decode steps dominate)."""
    durations: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if name.startswith(DECODE_STEP):
            name = "model_step"
        elif name == SAMPLER:
            name = "sampler"
        elif name not in LABELS:
            continue
        durations.setdefault(name, []).append(event.get("dur", 0) * 1e-6)
    return {name: statistics.median(values) for name, values in durations.items()}


def profile(runner: str, args: argparse.Namespace, trace_dir: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from distillgame.engine import EngineConfig, build_llm

    trace_dir.mkdir(parents=True, exist_ok=True)
    llm = build_llm(EngineConfig(
        teacher=args.teacher, proxy=args.proxy, dtype=args.dtype, max_model_len=512, max_num_seqs=args.batch,
        kv_cache_bytes=256 << 20, proxy_runner="vllm" if runner == "vllm-separate" else runner,
        extra_defense={"shared_trunk": False} if runner == "vllm-separate" else {},
        engine_overrides={"profiler_config": {"profiler": "torch", "torch_profiler_dir": str(trace_dir.resolve())}}))
    try:
        prompt = [{"prompt_token_ids": list(range(1000, 1000 + args.prompt_len))}] * args.batch
        params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0,
                                extra_args={"distillgame": {"mode": "poe", "gamma": 0.65}})
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        llm.start_profile()
        llm.generate(prompt, params, use_tqdm=False)
        llm.stop_profile()
    finally:
        llm.llm_engine.engine_core.shutdown()
    traces = sorted(trace_dir.glob("*.pt.trace.json*"))
    if not traces:
        raise RuntimeError(f"vLLM wrote no profiler trace under {trace_dir}")
    opener = gzip.open if traces[-1].suffix == ".gz" else open
    with opener(traces[-1], "rt") as fh:
        parts = parse_trace(json.load(fh)["traceEvents"])
    return {"runner": runner, "seconds_per_step": parts, "trace_file": traces[-1].name}


def markdown(report: dict[str, Any]) -> str:
    from distillgame.bench.overhead import report_header

    lines = report_header("Where a PoE engine step goes (torch profile, CPU time per engine step)", report)
    runs = report["runs"]
    lines += [f"Batch {report['batch']} PoE requests, prompt {report['prompt_len']} tokens, "
              f"{report['tokens']} decode steps profiled after a warm-up run; median ms per decode step.", "",
              "| part | " + " | ".join(r["runner"] for r in runs) + " |",
              "|---|" + "---|" * len(runs)]

    def row(label: str, key: str) -> str:
        cells = [f"{1000 * r['seconds_per_step'][key]:.2f}" if key in r["seconds_per_step"] else "-" for r in runs]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row("**model step** (vLLM's execute_model)", "model_step"))
    lines += [row(f"- {name.split('.', 1)[1]}", name) for name in LABELS[:4]]
    lines += [row("**sampler** (logits processors, sampling)", "sampler"), row("- defense_apply", LABELS[4]),
              row("  - of which the proxy's head (PoE rows)", LABELS[5])]
    totals = [1000 * (r["seconds_per_step"].get("model_step", 0) + r["seconds_per_step"].get("sampler", 0))
              for r in runs]
    lines += ["| **model step + sampler** | " + " | ".join(f"{t:.2f}" for t in totals) + " |", "",
              "On the transformers runner the model is the teacher's own (no labels inside it) and "
              "`defense_apply` holds the proxy's forward on its dense cache as well as the mix.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    fig, ax = axes((6, 3.5))
    runs = report["runs"]
    bottoms = [0.0] * len(runs)
    for name in LABELS[:5]:  # the head is inside defense_apply
        values = [1000 * r["seconds_per_step"].get(name, 0.0) for r in runs]
        name = name.split(".", 1)[1]
        ax.bar([r["runner"] for r in runs], values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("ms per engine step")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="distillgame-profile-"))
    runs = [profile(r, args, work / r) for r in args.runners.split(",") if r]
    report = {"benchmark": "step_profile", "command": "python -m distillgame.bench.step_profile " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": machine_info(), "batch": args.batch,
              "prompt_len": args.prompt_len, "tokens": args.tokens, "runs": runs}
    write_results(report, args.out, "step_profile", markdown, plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
