"""Decode-step time of the proxy runners alone, on one device: where the time of an eager runner goes.

Times, per batch size, one decode step of:
- ``poe``: :class:`ProxyRunner` on the proxy (PoE's extra work per step);
- ``ads``: :class:`JvpProxyRunner` on the proxy (ADS's, forward mode);
- ``teacher_eager``: :class:`ProxyRunner` on a teacher-sized model, for scale:
  the same eager transformers code over the teacher's layers. It is not what
  vLLM spends on the teacher (its own kernels, CUDA graphs on GPUs), which
  ``bench overhead`` measures through the server.

Each row's context is ``--context`` tokens, prefilled once; the modes
alternate within each round. Two times per step: ``host``, until ``step``
returns (the host has queued the work), and ``wall``, until the device has
finished it (a ``synchronize``, as vLLM's step waits for its sampled tokens).
On a GPU, host close to wall means the step is bound by launching kernels,
not by the device; that is the cost CUDA graphs remove.

Models: ``--proxy``/``--teacher`` folders, or by default random weights in
the embedded pair's shapes (SmolLM2-135M's 30 layers and the proxy's 10), so
it runs where no model can be fetched; timing does not depend on the values.

Usage: python -m distillgame.bench.runner_step --out bench/results/runner_step_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# SmolLM2-135M-Instruct, the embedded teacher (its config.json); the embedded proxy keeps its first 10 layers.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0)
TEACHER_LAYERS, PROXY_LAYERS = 30, 10


def _model(path: str | None, layers: int, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillgame.plugins.reference import load_causal_lm

    if path:
        return load_causal_lm(path, dtype).to(device)
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M)
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


def _direction(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: 1e-2 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_runners(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from distillgame.plugins.ads_jvp import JvpProxyRunner
    from distillgame.plugins.proxy_runner import ProxyRunner

    dtype = getattr(torch, args.dtype)
    device = args.device
    proxy = _model(args.proxy, PROXY_LAYERS, dtype, device, seed=1)
    teacher = _model(args.teacher, TEACHER_LAYERS, dtype, device, seed=0)
    grad = _direction(proxy)
    vocab = min(m.get_output_embeddings().weight.shape[0] for m in (proxy, teacher))
    capacity = args.context + args.warmup + args.rounds * args.steps + 8
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for batch in tqdm(args.batches, desc="batch sizes"):
        runners = {
            "poe": ProxyRunner(proxy, batch, torch.device(device), initial_capacity=capacity),
            "ads": JvpProxyRunner(proxy, grad, batch, torch.device(device), initial_capacity=capacity),
            "teacher_eager": ProxyRunner(teacher, batch, torch.device(device), initial_capacity=capacity),
        }
        slots = list(range(batch))
        prompt = [[(1000 + 7 * b + i) % vocab for i in range(args.context)] for b in slots]
        for runner in runners.values():
            runner.step(slots, prompt)
            for t in range(args.warmup):
                runner.step(slots, [[(100 + t) % vocab]] * batch)
        _sync(device)
        times = {mode: {"host": [], "wall": []} for mode in runners}
        token = 2000
        for _ in range(args.rounds):
            for mode, runner in runners.items():
                for _ in range(args.steps):
                    token += 1
                    start = time.perf_counter()
                    runner.step(slots, [[token % vocab]] * batch)
                    queued = time.perf_counter()
                    _sync(device)
                    end = time.perf_counter()
                    times[mode]["host"].append(queued - start)
                    times[mode]["wall"].append(end - start)
        results[str(batch)] = times
        if batch == args.profile_batch:
            for mode, runner in runners.items():
                token = _profile(runner, slots, mode, args, token, vocab)
        del runners
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def _profile(runner, slots: list[int], mode: str, args: argparse.Namespace, token: int, vocab: int) -> int:
    """Profile ``args.profile_steps`` decode steps of ``runner``; write the op table and return the next token."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            token += 1
            runner.step(slots, [[token % vocab]] * len(slots))
            _sync(args.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    launches = sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                      "cudaLaunchKernelExC"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{mode}_b{len(slots)}.txt").write_text(
        f"{mode}, batch {len(slots)}, {args.profile_steps} decode steps; kernel launches per step: "
        f"{launches / args.profile_steps:.0f}\n\n{table}\n")
    print(f"profile {mode} b{len(slots)}: {launches / args.profile_steps:.0f} kernel launches per step")
    return token


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for batch, times in results.items():
        wall = {mode: statistics.median(t["wall"]) for mode, t in times.items()}
        host = {mode: statistics.median(t["host"]) for mode, t in times.items()}
        rows.append({
            "batch": int(batch),
            **{f"{mode}_ms": 1e3 * wall[mode] for mode in wall},
            **{f"{mode}_host_share": host[mode] / wall[mode] for mode in wall},
            "poe_over_teacher": wall["poe"] / wall["teacher_eager"],
            "ads_over_teacher": wall["ads"] / wall["teacher_eager"],
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | PoE runner ms | ADS runner ms | teacher, eager ms | PoE/teacher | ADS/teacher "
             "| host share PoE / ADS / teacher |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['poe_ms']:.2f} | {r['ads_ms']:.2f} | {r['teacher_eager_ms']:.2f} "
            f"| {r['poe_over_teacher']:.2f} | {r['ads_over_teacher']:.2f} "
            f"| {r['poe_host_share']:.2f} / {r['ads_host_share']:.2f} / {r['teacher_eager_host_share']:.2f} |")
    return "\n".join(lines)


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Milliseconds per decode step by batch size, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    batches = [r["batch"] for r in rows]
    for mode, label in (("poe", "PoE runner"), ("ads", "ADS runner (forward mode)"),
                        ("teacher_eager", "teacher, eager (scale)")):
        ax.plot(batches, [r[f"{mode}_ms"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (decode rows)")
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--proxy", default=None, help="proxy folder (default: random, the embedded proxy's shape)")
    parser.add_argument("--teacher", default=None, help="teacher folder (default: random, SmolLM2-135M's shape)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=512, help="tokens in each row's cache before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-batch", type=int, default=None,
                        help="also profile this batch size's steps (torch profiler; profile_MODE_bB.txt)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/runner_step"))
    args = parser.parse_args(argv)
    results = time_runners(args)
    rows = summarize(results)
    table = markdown(rows)
    report = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.device),
              "rows": rows, "seconds": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runner_step.json").write_text(json.dumps(report, indent=1))
    where = report["machine"].get("gpu", report["machine"]["platform"])
    (args.out / "runner_step.md").write_text(
        f"# Proxy runners' decode step alone, {args.dtype} on {where}\n\n"
        f"Context {args.context} tokens per row; median of {args.rounds} x {args.steps} steps per mode, "
        f"modes interleaved by round. Host share: time until the step returned over time until the device "
        f"finished (near 1: bound by launching kernels).\n\n{table}\n")
    save_plot(rows, args.out / "runner_step.png", f"proxy runners' decode step, {args.dtype} on {where}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
