"""The proxy's KV memory: vLLM's paged cache against the transformers runner's dense slots.

Starts one engine per proxy runner on the same pair (the embedded default, or
given folders), admits ``--requests`` PoE requests of ``--tokens`` tokens each
(random prompt ids, a few generated tokens, EOS ignored) and steps until they
finish. Per runner it reports:

- ``vllm``: the proxy's live KV bytes at the step where the most requests are
  live, measured as vLLM's KV usage (the ``vllm:kv_cache_usage_perc`` gauge,
  over the pool's usable blocks) times the proxy layers' bytes per block (from
  the engine's own KV layout, ``distillgame_kv_layout``), against the target
  ``requests x tokens x bytes per token``;
- ``transformers``: the dense per-slot caches the processor allocated at start
  (``max_num_seqs x max_model_len x bytes per token``), live or not;
- both: vLLM's KV capacity in tokens for the same KV bytes. On the vllm runner
  every block also holds the proxy's layers, so the capacity is the teacher's
  alone times ``teacher_bpt / (teacher_bpt + proxy_bpt)``: vLLM counts the proxy;
- ``vllm`` with a proxy that is an early exit of the teacher (the embedded
  one) runs it on the teacher's trunk (:mod:`distillgame.plugins.early_exit`):
  no proxy pages at all, the capacity is the teacher's alone.
  ``vllm-separate`` is the same runner with the shared trunk off.

Per worker it also reports what each tensor-parallel rank holds: the
teacher's and the proxy's weights (each layer's shard on that rank, see
``distillgame_weight_bytes``; on the transformers runner the proxy beside the
engine is a full copy per rank), the teacher's and the proxy's KV pages in
vLLM's pool and the proxy's dense slots
(``--tensor-parallel-size N``; on CPUs the workers' thread binding is set as
``EngineConfig`` sets it).

Usage: python -m distillgame.bench.kv_memory --out bench/results
       python -m distillgame.bench.kv_memory --teacher bench/zoo/teacher --proxy bench/zoo/proxy \
           --tensor-parallel-size 2 --name kv_memory_tp2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from distillgame.bench.overhead import add_pair_arguments, axes, machine_info, save_figure, write_results
from distillgame.plugins.paged_proxy import PROXY_PREFIX


def _usage(llm) -> float:
    return next((m.value for m in llm.get_metrics() if m.name == "vllm:kv_cache_usage_perc"), float("nan"))


def measure(runner: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm
    from vllm import SamplingParams

    from distillgame.engine import EngineConfig, build_llm

    separate = runner == "vllm-separate"
    llm = build_llm(EngineConfig(teacher=args.teacher, proxy=args.proxy, dtype=args.dtype,
                                 max_model_len=args.max_model_len, max_num_seqs=args.requests,
                                 kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), disable_log_stats=False,
                                 proxy_runner="vllm" if separate else runner,
                                 extra_defense={"shared_trunk": False} if separate else {},
                                 tensor_parallel_size=args.tensor_parallel_size))
    try:
        per_rank = llm.collective_rpc("distillgame_kv_layout")
        weights = llm.collective_rpc("distillgame_weight_bytes")
        layout = per_rank[0]
        layers = layout["layers"]
        proxy_page = sum(v["page_bytes"] for k, v in layers.items() if k.startswith(PROXY_PREFIX + "."))
        teacher_page = sum(v["page_bytes"] for k, v in layers.items() if not k.startswith(PROXY_PREFIX + "."))
        block = next(iter(layers.values()))["block_size"]
        rng = random.Random(0)
        engine = llm.llm_engine
        vocab = min(20000, engine.vllm_config.model_config.get_vocab_size())
        params = SamplingParams(max_tokens=args.generate, temperature=0.0, ignore_eos=True,
                                extra_args={"distillgame": {"mode": "poe", "gamma": 0.65}})
        for i in range(args.requests):
            prompt = [rng.randrange(100, vocab) for _ in range(args.tokens - args.generate)]
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
        peak, steps = 0.0, 0
        with tqdm(total=args.requests, desc=f"kv memory ({runner})", disable=None) as bar:
            while engine.has_unfinished_requests():
                done = sum(out.finished for out in engine.step())
                bar.update(done)
                peak = max(peak, _usage(llm))
                steps += 1
        usable = layout["num_blocks"] - 1  # vLLM's usage leaves out its null block
        peak_blocks = round(peak * usable)  # the gauge is a fraction despite its name
        return {
            "runner": runner, "shared_trunk_layer": layout.get("shared_trunk_layer"),
            "num_blocks": layout["num_blocks"], "block_size": block,
            "capacity_tokens": layout["num_blocks"] * block,
            "teacher_bytes_per_token": teacher_page / block, "proxy_bytes_per_token_paged": proxy_page / block,
            "peak_usage": peak, "peak_blocks": peak_blocks, "steps": steps,
            "proxy_live_bytes": peak_blocks * proxy_page if runner != "transformers" else None,
            "dense_proxy_bytes": layout["dense_proxy_bytes"],
            "tensor_parallel_size": args.tensor_parallel_size,
            "ranks": [{**_rank_memory(rank, layout["num_blocks"]), **{k: v for k, v in w.items() if k != "tp_rank"}}
                      for rank, w in zip(per_rank, weights)],
        }
    finally:
        llm.llm_engine.engine_core.shutdown()


def _rank_memory(layout: dict[str, Any], num_blocks: int) -> dict[str, Any]:
    """The KV one worker holds: the teacher's and the proxy's pages in vLLM's pool, the proxy's dense slots."""
    pages = {"teacher": 0, "proxy": 0}
    for name, layer in layout["layers"].items():
        pages["proxy" if name.startswith(PROXY_PREFIX + ".") else "teacher"] += layer["page_bytes"]
    return {"tp_rank": layout.get("tp_rank", 0), "teacher_kv_pool_bytes": pages["teacher"] * num_blocks, "proxy_kv_pool_bytes": pages["proxy"] * num_blocks,
            "proxy_dense_kv_bytes": layout["dense_proxy_bytes"]}


def proxy_bytes_per_token(proxy: str | None, dtype: str) -> int:
    from transformers import AutoConfig

    from distillgame import models

    cfg = AutoConfig.from_pretrained(models.resolve(proxy, "proxy")).get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = 4 if dtype == "float32" else 2
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * size


def markdown(report: dict[str, Any]) -> str:
    from distillgame.bench.overhead import report_header

    n, length, bpt = report["requests"], report["tokens"], report["proxy_bytes_per_token"]
    target = n * length * bpt
    lines = report_header("Proxy KV memory: paged (vLLM) against dense (transformers)", report)
    lines += [f"{n} live PoE requests of {length} tokens; proxy {bpt} bytes per token (K and V, all layers); "
              f"target {n} x {length} x {bpt} = {target / 2**20:.1f} MiB.", "",
              "| runner | proxy KV held | / target | vLLM KV capacity (tokens) | blocks x block size | "
              "teacher + proxy bytes per token in vLLM's pool |",
              "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        held = _held(r)
        what = ("none: shared trunk" if r.get("shared_trunk_layer") else
                "dense slots (from start)" if r["runner"] == "transformers" else "live blocks (peak)")
        lines.append(f"| {r['runner']} | {held / 2**20:.1f} MiB ({what}) | {held / target:.3f} | "
                     f"{r['capacity_tokens']:,} | {r['num_blocks']} x {r['block_size']} | "
                     f"{r['teacher_bytes_per_token']:.0f} + {r['proxy_bytes_per_token_paged']:.0f} |")
    lines += ["", f"Per worker (tensor parallelism {report['runs'][0].get('tensor_parallel_size', 1)}), MiB:", "",
              "| runner | rank | teacher weights | proxy weights (in the engine's model) | proxy weights (beside it) | "
              "teacher KV pool | proxy KV pool | proxy dense KV | proxy KV bytes per token |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        for k in r.get("ranks", []):
            per_token = (k["proxy_kv_pool_bytes"] / r["capacity_tokens"] if k["proxy_kv_pool_bytes"]
                         else k["proxy_dense_kv_bytes"] / (report["requests"] * report["max_model_len"]))
            lines.append(f"| {r['runner']} | {k['tp_rank']} | {k['teacher_bytes'] / 2**20:.2f} | "
                         f"{k['proxy_bytes'] / 2**20:.2f} | {k['proxy_beside_bytes'] / 2**20:.2f} | "
                         f"{k['teacher_kv_pool_bytes'] / 2**20:.2f} | "
                         f"{k['proxy_kv_pool_bytes'] / 2**20:.2f} | {k['proxy_dense_kv_bytes'] / 2**20:.2f} | "
                         f"{per_token:.0f} |")
    runs = {r["runner"]: r for r in report["runs"]}
    if "transformers" in runs:
        t = runs["transformers"]
        for name in ("vllm", "vllm-separate"):
            if name not in runs:
                continue
            v = runs[name]
            expect = t["teacher_bytes_per_token"] / (v["teacher_bytes_per_token"] + v["proxy_bytes_per_token_paged"])
            lines += ["", f"Capacity ratio {name} / transformers (the undefended engine's pool): "
                      f"{v['capacity_tokens'] / t['capacity_tokens']:.3f} (teacher_bpt / (teacher_bpt + proxy_bpt) = "
                      f"{expect:.3f})" + (f"; shared trunk after layer {v['shared_trunk_layer']}: no proxy pages."
                                          if v.get("shared_trunk_layer") else
                                          ": vLLM's block count pays for the proxy's pages.")]
        lines += ["", "The dense runner's memory sits outside vLLM's accounting."]
    return "\n".join(lines + [""])


def _held(run: dict[str, Any]) -> int:
    """The proxy KV a run held: its live pages on the vllm runners, its dense slots on transformers."""
    return run["dense_proxy_bytes"] if run["runner"] == "transformers" else (run["proxy_live_bytes"] or 0)


def plot(report: dict[str, Any], path: Path) -> None:
    target = report["requests"] * report["tokens"] * report["proxy_bytes_per_token"]
    labels, values = ["target (live tokens)"], [target / 2**20]
    for r in report["runs"]:
        labels.append(r["runner"])
        values.append(_held(r) / 2**20)
    fig, ax = axes((5, 3.5))
    ax.bar(labels, values, color=["gray", "tab:blue", "tab:orange", "tab:green"][: len(values)])
    ax.set_ylabel("proxy KV (MiB)")
    ax.set_title(f"{report['requests']} requests x {report['tokens']} tokens")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(p)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=512, help="prompt + generated tokens per request")
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="workers the engine is sharded over; the per-worker table has a row per rank")
    p.add_argument("--name", default="kv_memory", help="result file stem under --out")
    args = p.parse_args(argv)
    runs = [measure(r, args) for r in args.runners.split(",") if r]
    report = {"benchmark": "kv_memory", "command": "python -m distillgame.bench.kv_memory " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": machine_info(), "requests": args.requests,
              "tokens": args.tokens, "max_model_len": args.max_model_len,
              "proxy_bytes_per_token": proxy_bytes_per_token(args.proxy, args.dtype), "runs": runs}
    write_results(report, args.out, args.name, markdown, plot)
    print(markdown(report))
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
