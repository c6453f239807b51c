"""Per-step cost of the defense inside the engine, and of the proxy runner alone.

Runs one engine on the embedded default pair (or given folders) and, for each
batch size, times a batch of fixed-length generations (EOS ignored) for modes
none / PoE / ADS, interleaved by round; the per-step time is wall time over
output length. Separately times :class:`ProxyRunner` decode steps alone. Prints
a Markdown table and writes JSON next to it.

Usage: python -m distillgame.bench.step_cost --out bench/results/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def _engine_costs(args, grad_path: str, batches: list[int]) -> tuple[dict, int]:
    from vllm import SamplingParams

    from distillgame.engine import EngineConfig, build_llm

    llm = build_llm(
        EngineConfig(
            teacher=args.teacher,
            proxy=args.proxy,
            ads_grad=grad_path,
            max_model_len=512,
            max_num_seqs=max(batches),
            memory_share=args.memory_share,
        )
    )
    modes = {
        "none": {"mode": "none"},
        "poe": {"mode": "poe", "gamma": 0.65},
        "ads": {"mode": "ads", "lam": 0.05, "eps": 1e-4},
    }
    prompt = [{"prompt_token_ids": list(range(1000, 1000 + args.prompt_len))}]
    results: dict[str, dict[str, list[float]]] = {str(b): {m: [] for m in modes} for b in batches}
    # Warm-up per mode: ADS builds its perturbed proxy pair on first use.
    for defense in modes.values():
        llm.generate(prompt, SamplingParams(max_tokens=4, extra_args={"distillgame": defense}), use_tqdm=False)
    for _ in range(args.rounds):
        for b in batches:
            for mode, defense in modes.items():
                params = SamplingParams(
                    max_tokens=args.tokens, ignore_eos=True, temperature=0.0, extra_args={"distillgame": defense}
                )
                start = time.perf_counter()
                llm.generate(prompt * b, params, use_tqdm=False)
                results[str(b)][mode].append((time.perf_counter() - start) / args.tokens)
    return results, 0


def _runner_costs(args, batches: list[int]) -> dict[str, float]:
    import torch

    from distillgame import models
    from distillgame.plugins.proxy_runner import ProxyRunner
    from distillgame.plugins.reference import load_causal_lm

    model = load_causal_lm(models.resolve(args.proxy, "proxy"), torch.bfloat16)
    out = {}
    for b in batches:
        runner = ProxyRunner(model, b, torch.device("cpu"))
        slots = list(range(b))
        runner.step(slots, [list(range(1000, 1000 + args.prompt_len))] * b)
        times = []
        for t in range(args.tokens):
            start = time.perf_counter()
            runner.step(slots, [[1000 + t]] * b)
            times.append(time.perf_counter() - start)
        out[str(b)] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--proxy", default=None)
    parser.add_argument("--ads-grad", required=True, help="gradient file for the proxy (distillgame ads-grad)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-share", type=float, default=0.15)
    parser.add_argument("--out", default="bench/results/step_cost.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    engine, _ = _engine_costs(args, args.ads_grad, batches)
    runner = _runner_costs(args, batches)
    report = {
        "command": "python -m distillgame.bench.step_cost " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
        ),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "engine_seconds_per_step": {b: {m: statistics.median(v) for m, v in d.items()} for b, d in engine.items()},
        "proxy_runner_seconds_per_decode_step": runner,
    }
    lines = ["| batch | none s/step | PoE s/step | ADS s/step | PoE/none | ADS/none | proxy runner alone s/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in map(str, batches):
        e = report["engine_seconds_per_step"][b]
        lines.append(
            f"| {b} | {e['none']:.4f} | {e['poe']:.4f} | {e['ads']:.4f} | {e['poe']/e['none']:.2f} | "
            f"{e['ads']/e['none']:.2f} | {runner[b]:.4f} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(f"# Defense cost per engine step\n\n`{report['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
