"""Probe, on a real engine, that the defense fails closed: a NaN proxy releases nothing.

Builds the tiny test pair (a random 3-layer teacher, a 1-layer proxy, one
tokenizer), poisons one proxy embedding row with NaN, and asks a defended
engine for completions: one prompt that never reads the poisoned token (it is
served), one that does (the step must fail and no token of it be released).
Prints one line per check; exit status 0 when all hold.

    .venv/bin/python bench/studies/fail_closed_probe.py --work /tmp/probe

Not for: the test suite (``tests/test_fail_closed.py`` checks the same
processor path without an engine per case).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from safetensors.torch import load_file, save_file
    from tiny_models import make_llama, make_tokenizer
    from vllm import SamplingParams

    from distillgame.engine import EngineConfig, build_llm

    tok = make_tokenizer()
    teacher = make_llama(args.work / "teacher", tok, layers=3, seed=0)
    proxy = make_llama(args.work / "nan-proxy", tok, layers=1, seed=1)
    weights = load_file(str(proxy / "model.safetensors"))
    poisoned = 42
    weights["model.embed_tokens.weight"][poisoned] = float("nan")
    save_file(weights, str(proxy / "model.safetensors"), metadata={"format": "pt"})

    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128,
                                 max_num_seqs=4, kv_cache_bytes=32 << 20))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2,
                            extra_args={"distillgame": {"mode": "poe", "gamma": 0.65}})
    checks: list[tuple[str, bool, str]] = []
    clean = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0]
    served = poisoned not in clean.token_ids and len(clean.token_ids) == 8
    checks.append(("clean prompt served", served, f"{len(clean.token_ids)} tokens"))
    try:
        out = llm.generate([{"prompt_token_ids": [5, poisoned, 7]}], params, use_tqdm=False)
        checks.append(("NaN prompt refused", False, f"released {list(out[0].outputs[0].token_ids)}"))
    except Exception as exc:  # the engine core dies: that is the fail-closed path
        checks.append(("NaN prompt refused", True, f"{type(exc).__name__}, no tokens released"))
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<22} {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
