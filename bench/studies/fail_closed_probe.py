"""Probe, on real engines, that the defense fails closed.

Builds the tiny test pair (a random 3-layer teacher, a 1-layer proxy, one
tokenizer) and checks, one engine each:

1. vLLM's hard masks survive PoE at gamma = 1 (where the release is the
   proxy's distribution): the tokens the proxy itself picks when unmasked are
   banned with ``bad_words`` or left out of ``allowed_token_ids``, and no
   sampled token or reported top-logprob token is a masked one;
2. an engine configured with speculative decoding and the defense refuses to
   start (vLLM would drop the processor and serve undefended);
3. a proxy with a NaN embedding row: a prompt that never reads the poisoned
   token is served, one that does fails its step and releases no token.

Prints one line per check; exit status 0 when all hold.

    .venv/bin/python bench/studies/fail_closed_probe.py --work /tmp/probe

Not for: the test suite (``tests/test_fail_closed.py`` checks the same
processor path without an engine per case).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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

    from distillgame.engine import DefenseNotLive, EngineConfig, build_llm

    tok = make_tokenizer()
    teacher = make_llama(args.work / "teacher", tok, layers=3, seed=0)
    checks: list[tuple[str, bool, str]] = []

    # 1. hard masks at gamma = 1
    clean_proxy = make_llama(args.work / "proxy", tok, layers=1, seed=1)
    engine = EngineConfig(teacher=str(teacher), proxy=str(clean_proxy), dtype="float32", max_model_len=128,
                          max_num_seqs=4, kv_cache_bytes=32 << 20)
    llm = build_llm(engine)
    prompt = {"prompt_token_ids": [12, 40, 41, 99, 100, 7]}
    poe1 = {"distillgame": {"mode": "poe", "gamma": 1.0}}

    def released(n: int, **masks) -> list[tuple[list[int], set[int]]]:
        """n sampled completions: (tokens, every token named in their top-5 logprobs)."""
        outs = []
        for seed in range(n):
            params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, logprobs=5, extra_args=poe1, **masks)
            o = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            shown = {t for step in o.logprobs for t, lp in step.items() if lp.logprob > float("-inf")}
            outs.append((list(o.token_ids), shown))
        return outs

    favourites = {t for tokens, _ in released(8) for t in tokens}
    tokenizer = llm.get_tokenizer()
    words = [w for w in (tokenizer.decode([t]) for t in sorted(favourites)) if w.strip()]
    ban = SamplingParams(bad_words=words)
    ban.update_from_tokenizer(tokenizer)
    banned = {ids[0] for ids in ban.bad_words_token_ids if len(ids) == 1} & favourites
    leaked = {t for tokens, _ in released(8, bad_words=words) for t in tokens} & banned
    checks.append(("bad_words at gamma 1", bool(banned) and not leaked,
                   f"{len(banned)} of the proxy's picks banned, {len(leaked)} released"))
    allowed = sorted(set(range(200, 230)) - favourites)
    outside = set()
    for tokens, shown in released(8, allowed_token_ids=allowed):
        outside |= (set(tokens) | shown) - set(allowed)
    checks.append(("allowed_token_ids at 1", not outside,
                   f"{len(allowed)} allowed, {len(outside)} others sampled or shown"))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()

    # 2. speculative decoding
    spec = dataclasses.replace(engine, engine_overrides={"speculative_config": {
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}})
    try:
        build_llm(spec)
        checks.append(("speculative refused", False, "a defended engine started with speculative decoding"))
    except DefenseNotLive as exc:
        checks.append(("speculative refused", True, str(exc).split(";")[0][:70]))

    # 3. NaN proxy
    proxy = make_llama(args.work / "nan-proxy", tok, layers=1, seed=1)
    weights = load_file(str(proxy / "model.safetensors"))
    poisoned = 42
    weights["model.embed_tokens.weight"][poisoned] = float("nan")
    save_file(weights, str(proxy / "model.safetensors"), metadata={"format": "pt"})

    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128,
                                 max_num_seqs=4, kv_cache_bytes=32 << 20))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2,
                            extra_args={"distillgame": {"mode": "poe", "gamma": 0.65}})
    clean = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0]
    served = poisoned not in clean.token_ids and len(clean.token_ids) == 8
    checks.append(("clean prompt served", served, f"{len(clean.token_ids)} tokens"))
    try:
        out = llm.generate([{"prompt_token_ids": [5, poisoned, 7]}], params, use_tqdm=False)
        checks.append(("NaN prompt refused", False, f"released {list(out[0].outputs[0].token_ids)}"))
    except Exception as exc:  # the engine core dies: that is the fail-closed path
        checks.append(("NaN prompt refused", True, f"{type(exc).__name__}, no tokens released"))
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<24} {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
