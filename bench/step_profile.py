"""Where a PoE engine step goes on the vLLM-layer proxy path: a torch profile, per part.

Starts one engine per proxy runner (the embedded pair by default) with vLLM's
torch profiler on, warms it up, and profiles ``--tokens`` decode steps of a
batch of ``--batch`` PoE requests. The defended model and the processor label
their parts (``record_function``): ``distillgame.teacher_forward``,
``distillgame.proxy_forward``, ``distillgame.hidden_concat``,
``distillgame.proxy_logits``, ``distillgame.teacher_logits`` and
``distillgame.defense_apply`` (the processor: on the transformers runner it
includes that runner's proxy forward). The table is read from the profile
summary vLLM writes (``*.profiler_out.txt``): CPU time per label, divided by
the number of engine steps, next to the whole ``execute_model`` step.

Usage: python -m distillgame.bench.step_profile --out bench/results
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillgame.bench.overhead import machine_info, write_results

LABELS = ["distillgame.teacher_forward", "distillgame.proxy_forward", "distillgame.hidden_concat",
          "distillgame.proxy_logits", "distillgame.teacher_logits", "distillgame.defense_apply"]
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """``{name: {"total_s": CPU total, "calls": n}}`` from a torch profiler ``key_averages().table()``."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("Name"))
    columns = [c.strip() for c in re.split(r"\s{2,}", lines[header].strip())]
    total_col, calls_col = columns.index("CPU total"), columns.index("# of Calls")
    out: dict[str, dict[str, float]] = {}
    for line in lines[header + 2:]:
        cells = [c.strip() for c in re.split(r"\s{2,}", line.strip())]
        if len(cells) != len(columns):
            continue
        match = re.fullmatch(r"([\d.]+)(us|ms|s)", cells[total_col])
        if match:
            out[cells[0]] = {"total_s": float(match[1]) * _UNITS[match[2]], "calls": int(cells[calls_col])}
    return out


def profile(runner: str, args: argparse.Namespace, trace_dir: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from distillgame.engine import EngineConfig, build_llm

    trace_dir.mkdir(parents=True, exist_ok=True)
    llm = build_llm(EngineConfig(
        teacher=args.teacher, proxy=args.proxy, dtype=args.dtype, max_model_len=512, max_num_seqs=args.batch,
        kv_cache_bytes=256 << 20, proxy_runner=runner,
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
    tables = sorted(trace_dir.glob("*profiler_out*.txt"))
    if not tables:
        raise RuntimeError(f"vLLM wrote no profiler summary under {trace_dir}")
    rows = parse_table(tables[-1].read_text())
    steps = rows.get("gpu_model_runner: forward", {}).get("calls") or args.tokens
    parts = {name: rows[name]["total_s"] / steps for name in LABELS if name in rows}
    step = next((rows[k]["total_s"] / rows[k]["calls"] for k in ("execute_model", "ModelRunner.execute_model")
                 if k in rows), None)
    return {"runner": runner, "steps": steps, "seconds_per_step": parts, "execute_model_s": step,
            "table_file": tables[-1].name}


def markdown(report: dict[str, Any]) -> str:
    from distillgame.bench.overhead import report_header

    lines = report_header("Where a PoE engine step goes (torch profile, CPU time per engine step)", report)
    runs = report["runs"]
    lines += [f"Batch {report['batch']} PoE requests, prompt {report['prompt_len']} tokens, "
              f"{report['tokens']} decode steps profiled after a warm-up run; ms per engine step "
              "(prefill step included in the average).", "",
              "| part | " + " | ".join(r["runner"] for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for name in LABELS:
        cells = [f"{1000 * r['seconds_per_step'][name]:.2f}" if name in r["seconds_per_step"] else "-" for r in runs]
        lines.append(f"| {name.split('.', 1)[1]} | " + " | ".join(cells) + " |")
    cells = [f"{1000 * r['execute_model_s']:.2f}" if r["execute_model_s"] else "-" for r in runs]
    lines += ["| whole step (execute_model) | " + " | ".join(cells) + " |", "",
              "On the transformers runner the model is the teacher's own (no labels inside it) and "
              "`defense_apply` holds the proxy's forward on its dense cache.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    runs = report["runs"]
    bottoms = [0.0] * len(runs)
    for name in LABELS:
        values = [1000 * r["seconds_per_step"].get(name, 0.0) for r in runs]
        ax.bar([r["runner"] for r in runs], values, bottom=bottoms, label=name.split(".", 1)[1])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("ms per engine step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None)
    p.add_argument("--proxy", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runners", default="vllm,transformers")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
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
