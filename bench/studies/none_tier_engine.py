"""Undefended rows in a defended engine against a plain engine, offline: what the shared trunk costs them.

Starts two engines on the embedded teacher with the same engine arguments:
vLLM's plain ``LLM`` (no ``distillgame`` section) and the defended engine
(``build_llm``; the embedded proxy is an early exit, so it runs on the
teacher's trunk). Each generates the same batch of undefended requests
(greedy, ``ignore_eos``) in interleaved rounds, the order alternating, and the
script prints the median time per generated token of each and their ratio.
No HTTP front end, so the number is the engine's alone (the server-level
arms are in ``distillgame bench overhead``)::

    .venv/bin/python bench/studies/none_tier_engine.py --batch 1 --rounds 8 --out none_tier.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    from vllm import LLM, SamplingParams

    from distillgame import models
    from distillgame.engine import EngineConfig, build_llm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = p.parse_args()

    cfg = EngineConfig(teacher=models.resolve(None, "teacher"), proxy=models.resolve(None, "proxy"),
                       max_model_len=512, max_num_seqs=max(8, args.batch), kv_cache_bytes=256 << 20)
    plain = LLM(**{k: v for k, v in cfg.engine_kwargs().items() if k not in ("additional_config", "hf_overrides")})
    defended = build_llm(cfg)
    prompts = [{"prompt_token_ids": list(range(1000 + i, 1040 + i))} for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    engines = {"plain": plain, "defended": defended}
    for llm in engines.values():
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            start = time.perf_counter()
            engines[name].generate(prompts, params, use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
    per_token = {name: statistics.median(s) * 1000 / args.tokens for name, s in seconds.items()}
    result = {"batch": args.batch, "tokens": args.tokens, "rounds": args.rounds, "ms_per_step": per_token,
              "ratio": per_token["defended"] / per_token["plain"], "seconds": seconds}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
