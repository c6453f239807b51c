"""The reference approach to serving PoE, timed against our server.

The public antidistillation code serves a defense with Hugging Face
``generate`` and a ``LogitsProcessor`` that runs the proxy next to the teacher:
the processor keeps the proxy's own KV cache (a cached wrapper: the first call
feeds the whole left-padded prompt, later calls one token per row), and
requests are served in static batches, so a batch runs until its longest member
is done. :class:`CachedProxyPoE` is that processor; :func:`hf_serve` runs a
request list through it batch by batch.

Two workloads, same models and token-id prompts on both sides:

- ``fixed``: the overhead benchmark's narrative prompts, ``max_tokens`` outputs;
- ``traces``: GSM-Symbolic questions in the chat template, each with the output
  length the undefended teacher itself used when answering it (collected from
  our server's ``none`` tier first), so lengths vary like real traces.

Interleaved: per workload and concurrency the sides take turns (our server on
each proxy runner, ``--proxy-runners``, and the reference), the order rotating
from one concurrency to the next; the servers stay up, idle while the
reference runs, so machine drift hits every side alike.

Each request has its own token limit on both sides; HF has no per-row
``max_new_tokens``, so :class:`RowLimits` forces EOS on a row once it reaches
its limit (a finished row then only pads, as in any static batch). Useful
tokens = tokens up to and including the row's end. Sampling: temperature 1,
no top-k/top-p, on both sides.

Not for: the overhead-vs-limit measurement (see :mod:`distillgame.bench.overhead`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillgame.bench.overhead import PROMPTS, Server, machine_info, percentile

logger = logging.getLogger(__name__)

POLICY = """
[tiers.none]
defense = {{ mode = "none" }}

[tiers.poe]
defense = {{ mode = "poe", gamma = {gamma} }}

[[keys]]
key = "sk-bench-none"
tier = "none"

[[keys]]
key = "sk-bench-poe"
tier = "poe"
"""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int


class CachedProxyPoE:
    """HF logits processor: PoE (eq. 5) with a proxy that keeps its own KV cache across steps."""

    def __init__(self, proxy: torch.nn.Module, attention_mask: torch.Tensor, gamma: float, vocab: int) -> None:
        self.proxy = proxy
        self.mask = attention_mask
        self.gamma = gamma
        self.vocab = vocab
        self.past: Any = None

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from transformers import DynamicCache

        if self.past is None:
            mask = self.mask
            feed = input_ids
            self.past = DynamicCache()
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            mask = self.mask
            feed = input_ids[:, -1:]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1]:]
        out = self.proxy(input_ids=feed, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                         use_cache=True)
        self.past = out.past_key_values
        proxy_lp = torch.log_softmax(out.logits[:, -1, : self.vocab].float(), dim=-1)
        teacher_lp = torch.log_softmax(scores[:, : self.vocab].float(), dim=-1)
        mixed = scores.clone().float()
        mixed[:, : self.vocab] = (1.0 - self.gamma) * teacher_lp + self.gamma * proxy_lp
        mixed[:, self.vocab:] = float("-inf")
        return mixed


class RowLimits:
    """Per-row ``max_tokens`` inside one static batch: force EOS once a row reached its limit."""

    def __init__(self, prompt_len: int, limits: list[int], eos: int) -> None:
        self.prompt_len = prompt_len
        self.limits = torch.tensor(limits)
        self.eos = eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        done = (input_ids.shape[1] - self.prompt_len) >= self.limits - 1
        if bool(done.any()):
            scores[done] = float("-inf")
            scores[done, self.eos] = 0.0
        return scores


def hf_serve(teacher: torch.nn.Module, proxy: torch.nn.Module | None, tokenizer: Any, requests: list[Request],
             batch: int, gamma: float, seed: int = 0) -> dict[str, Any]:
    """Serve ``requests`` in static batches of ``batch`` (arrival order); useful tokens and wall time."""
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = min(teacher.config.vocab_size, proxy.config.vocab_size if proxy is not None else 1 << 30)
    torch.manual_seed(seed)
    useful = 0
    latencies: list[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        group = requests[start: start + batch]
        width = max(len(r.prompt_ids) for r in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, r in enumerate(group):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        procs = []
        if proxy is not None:
            procs.append(CachedProxyPoE(proxy, mask, gamma, vocab))
        procs.append(RowLimits(width, [r.max_tokens for r in group], eos))
        tb = time.perf_counter()
        with torch.inference_mode():
            out = teacher.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max(r.max_tokens for r in group), logits_processor=LogitsProcessorList(procs),
                pad_token_id=pad, eos_token_id=eos,
            )
        batch_wall = time.perf_counter() - tb
        for row in out[:, width:].tolist():
            n = row.index(eos) + 1 if eos in row else len(row)
            useful += n
        latencies += [batch_wall] * len(group)
    wall = time.perf_counter() - t0
    return {"tokens": useful, "wall_s": wall, "tok_per_s": useful / wall, "requests": len(requests),
            "latency_p50": percentile(latencies, 50), "latency_p99": percentile(latencies, 99)}


async def server_serve(url: str, key: str, requests: list[Request], concurrency: int, seed: int = 0) -> dict[str, Any]:
    """The same requests through our server (continuous batching), at most ``concurrency`` in flight."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, timeout=1200.0, max_retries=0)
    model = (await client.models.list()).data[0].id
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def go(i: int, r: Request) -> int:
        async with sem:
            t = time.perf_counter()
            # No per-request seed: on vLLM-CPU a seeded request whose prefill is chunked fails in the
            # engine ("CPU Generator does not use offset"), and the server then answers 500.
            resp = await client.completions.create(model=model, prompt=r.prompt_ids, max_tokens=r.max_tokens,
                                                   temperature=1.0)
            latencies.append(time.perf_counter() - t)
            return resp.usage.completion_tokens

    await go(0, Request(requests[0].prompt_ids, 4))  # warm-up
    latencies.clear()
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(go(i, r) for i, r in enumerate(requests))))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "requests": len(requests),
            "latency_p50": percentile(latencies, 50), "latency_p99": percentile(latencies, 99)}


async def teacher_trace_lengths(url: str, prompts: list[list[int]], cap: int) -> list[int]:
    """Output lengths of the undefended teacher's own answers (sampled at temperature 1, capped)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-bench-none", timeout=1200.0, max_retries=0)
    model = (await client.models.list()).data[0].id
    sem = asyncio.Semaphore(32)

    async def go(i: int, ids: list[int]) -> int:
        async with sem:
            r = await client.completions.create(model=model, prompt=ids, max_tokens=cap, temperature=1.0)
            return r.usage.completion_tokens

    lengths = list(await asyncio.gather(*(go(i, p) for i, p in enumerate(prompts))))
    await client.close()
    return lengths


def n_requests(c: int, quick: bool) -> int:
    # Four requests per slot: the first wave's simultaneous start and the last
    # wave's drain are a small part of the run, as in a server's steady state.
    return max(2, c) if quick else max(4, 4 * c)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Our server vs the reference approach (HF generate + cached proxy logits processor, static batches)",
             "", f"Command: `{report['command']}`", ""]
    if report.get("note"):
        lines += [f"Note: {report['note']}", ""]
    if report.get("reference_from"):
        rf = report["reference_from"]
        lines += [f"Reference columns and request lengths reused from `{rf['file']}` (`{rf['command']}`); "
                  "only our server was timed in this run.", ""]
    if report.get("trace_lengths"):
        tl = report["trace_lengths"]
        lines += [f"Trace lengths (teacher's own GSM-Symbolic answers, tokens): mean {tl['mean']:.0f}, "
                  f"min {tl['min']}, max {tl['max']} over {tl['n']}.", ""]
    lines += ["| workload | conc | requests | proxy runner | ours PoE tok/s | ours none tok/s | reference PoE tok/s | "
              "speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['requests']} | {r.get('runner', 'transformers')} | "
                     f"{r['ours_poe']['tok_per_s']:.1f} | "
                     f"{r['ours_none']['tok_per_s'] if r['ours_none'] else float('nan'):.1f} | {r['reference_poe']['tok_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for wl, style in (("fixed", "--"), ("traces", "-")):
        rows = [r for r in report["results"] if r["workload"] == wl]
        if not rows:
            continue
        runners = list(dict.fromkeys(r.get("runner", "transformers") for r in rows))
        for runner, color in zip(runners, ("tab:blue", "tab:green")):
            mine = [r for r in rows if r.get("runner", "transformers") == runner]
            ax.plot([r["concurrency"] for r in mine], [r["ours_poe"]["tok_per_s"] for r in mine], "o" + style,
                    color=color, label=f"ours PoE, {runner} proxy ({wl})")
        first = [r for r in rows if r.get("runner", "transformers") == runners[0]]
        ax.plot([r["concurrency"] for r in first], [r["reference_poe"]["tok_per_s"] for r in first], "s" + style,
                color="tab:orange", label=f"HF reference PoE ({wl})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (reference: static batch size)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_reference(args: Any, command: str = "") -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillgame import models
    from distillgame.tasks import build_chat_messages, load_problems

    quick = bool(getattr(args, "quick", False))
    concurrencies = [1, 8] if quick else list(args.concurrency)
    gamma = float(args.gamma)
    teacher_dir = models.resolve(None, "teacher")
    proxy_dir = models.resolve(None, "proxy")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    workloads = ["fixed", "traces"] if args.workload == "both" else [args.workload]
    max_n = n_requests(max(concurrencies), quick)

    fixed_prompts = [tok(p)["input_ids"] for p in PROMPTS]
    problems = load_problems("gsm-symbolic", "test", n=max_n, seed=0)
    trace_prompts = [tok.apply_chat_template(build_chat_messages(p, "gsm-symbolic"), add_generation_prompt=True,
                                             tokenize=True) for p in problems]
    trace_prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in trace_prompts]
    cap = 64 if quick else int(getattr(args, "cap", 800))

    # Both sides in the same dtype. bfloat16 is the checkpoint's own and, on CPUs
    # with bf16 instructions, the faster one for HF generate as well.
    dtype = str(getattr(args, "dtype", "bfloat16"))
    work = Path(tempfile.mkdtemp(prefix="distillgame-ref-"))
    policy = work / "policy.toml"
    policy.write_text(POLICY.format(gamma=gamma))
    # KV cache for every slot at the full 1024 positions (SmolLM2: 23 KB per token in bf16),
    # so long traces at concurrency 32 are never preempted.
    kv_gib = max(0.5, max(concurrencies) * 1024 * 24 * 1024 / (1 << 30))
    runners = [r for r in str(getattr(args, "proxy_runners", "transformers")).split(",") if r]
    servers = {runner: Server(["--policy", str(policy), "--proxy-runner", runner, "--max-model-len", "1024",
                               "--max-num-seqs", str(max(concurrencies)), "--memory-share", "0.1",
                               "--kv-cache-gib", f"{kv_gib:.2f}", "--dtype", dtype], work / f"serve-{runner}.log")
               for runner in runners}
    plan: dict[tuple[str, int], list[Request]] = {}
    ours: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = {}
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    trace_lengths: list[int] = []
    reuse = getattr(args, "reuse_reference", None)
    earlier = json.loads(Path(reuse).read_text()) if reuse else None
    stored = {(r["workload"], r["concurrency"]): r for r in earlier["results"]} if earlier else {}
    if earlier is None:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, dtype)).eval()
        proxy = AutoModelForCausalLM.from_pretrained(proxy_dir, dtype=getattr(torch, dtype)).eval()
    try:
        for server in servers.values():
            server.wait_ready()
        first = next(iter(servers.values()))
        if earlier is not None:
            trace_lengths = list(earlier.get("trace_lengths", {}).get("values", []))
        elif "traces" in workloads:
            trace_lengths = asyncio.run(teacher_trace_lengths(first.url, trace_prompts, cap))
            logger.info("teacher trace lengths: %s", trace_lengths)
        turn = 0
        for wl in workloads:
            for c in concurrencies:
                n = n_requests(c, quick)
                prompts = [fixed_prompts[i % len(fixed_prompts)] if wl == "fixed" else trace_prompts[i] for i in range(n)]
                if earlier is not None:  # the very requests the stored reference served
                    if (wl, c) not in stored:
                        raise SystemExit(f"{reuse} has no {wl} run at concurrency {c}")
                    reqs = [Request(p, m) for p, m in zip(prompts, stored[(wl, c)]["max_tokens"])]
                elif wl == "fixed":
                    reqs = [Request(p, 16 if quick else args.max_tokens) for p in prompts]
                else:
                    reqs = [Request(p, max(1, trace_lengths[i])) for i, p in enumerate(prompts)]
                plan[(wl, c)] = reqs
                # Each side in turn (the order rotates), the others idle meanwhile.
                sides: list[str] = [*runners, "reference"]
                sides = sides[turn % len(sides):] + sides[: turn % len(sides)]
                turn += 1
                for side in sides:
                    if side == "reference":
                        refs[(wl, c)] = (stored[(wl, c)]["reference_poe"] if earlier is not None
                                         else hf_serve(teacher, proxy, tok, reqs, c, gamma))
                        logger.info("reference %s c=%d: %s", wl, c, refs[(wl, c)])
                        continue
                    url = servers[side].url
                    mine = ours[(wl, c, side)] = {"poe": asyncio.run(server_serve(url, "sk-bench-poe", reqs, c))}
                    if not getattr(args, "skip_none", False):
                        mine["none"] = asyncio.run(server_serve(url, "sk-bench-none", reqs, c))
                    logger.info("ours (%s) %s c=%d: %s", side, wl, c, mine)
    finally:
        for server in servers.values():
            server.stop()

    results = []
    for (wl, c), reqs in plan.items():
        ref = refs[(wl, c)]
        for runner in runners:
            mine = ours[(wl, c, runner)]
            results.append({"workload": wl, "concurrency": c, "runner": runner, "requests": len(reqs),
                            "max_tokens": [r.max_tokens for r in reqs], "ours_poe": mine["poe"],
                            "ours_none": mine.get("none"), "reference_poe": ref,
                            "speedup": mine["poe"]["tok_per_s"] / ref["tok_per_s"]})
    report: dict[str, Any] = {
        "benchmark": "reference", "command": command, "note": getattr(args, "note", ""), "gamma": gamma,
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "dtype": f"{dtype} (server and reference)", "results": results,
    }
    if earlier is not None:
        report["reference_from"] = {"file": str(reuse), "command": earlier.get("command"), "note": earlier.get("note"),
                                    "machine": earlier.get("machine")}
    if trace_lengths:
        report["trace_lengths"] = {"n": len(trace_lengths), "mean": sum(trace_lengths) / len(trace_lengths),
                                   "min": min(trace_lengths), "max": max(trace_lengths), "values": trace_lengths}
    report["markdown"] = markdown(report)
    out = Path(args.out)
    stem = "reference_quick" if quick else "reference"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report["markdown"])
    plot(report, out / f"{stem}.png")
    return report
