"""Budget calibration: the gamma (PoE) or lam (ADS) whose mean KL equals eps.

Theorem 3.1: the dual parameter that makes the fidelity budget tight is the one
where the mean per-token KL(released || teacher) equals the budget ``eps``.
KL grows with gamma (PoE, from 0 at gamma = 0) and with lam (ADS, from 0 at
lam = 0), so bisection finds it.

How KL is measured: teacher traces are sampled (temperature 1) for the
calibration and the held-out prompts; one full forward of the teacher and the
proxy (PoE) of :class:`~distillgame.plugins.reference.ReferenceModels` over each
trace gives the next-token log-probs (normalized in float64) at every trace
position; for ADS, one forward-mode pass of the proxy
(:class:`~distillgame.plugins.ads_jvp.JvpProxyRunner`, as the engine runs it)
gives the directional derivative ``<g, grad log p_proxy>`` there instead. Any
gamma/lam is then mixed with the engine's own ``poe_mix``/``ads_tilt_derivative``
and scored with ``kl_and_agreement`` (the engine's fidelity counter), so
bisection costs no further forwards. They are stored in float32, or float16
(``--store float16``) to fit a thousand prompts in memory: a vocabulary-wide row
is 196 KB in float32 for SmolLM2, and the KL moves by well under 1% (tested). The parameter found on the calibration prompts is checked
on the held-out prompts (within ``tol_holdout``, 5% relative by default) and
written into a policy tier.

Not for: measuring the budget of a running server (its ``/metrics`` has
``distillgame_fidelity_kl_per_token``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillgame import models
from distillgame.plugins.mixing import ads_tilt_derivative, kl_and_agreement, poe_mix

logger = logging.getLogger(__name__)


_STORE = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class PositionLogprobs:
    """Log-probs at every trace position: teacher, and the proxy side for the mode."""

    teacher: torch.Tensor  # [positions, vocab], float32 or float16 (normalized in float64 first)
    proxy: torch.Tensor | None = None  # PoE: the proxy's log-probs
    directional: torch.Tensor | None = None  # ADS: <g, grad_theta log p_proxy>

    def parts(self) -> tuple[torch.Tensor | None, ...]:
        return self.teacher, self.proxy, self.directional


def mean_kl(lp: PositionLogprobs, mode: str, value: float, chunk: int = 256) -> float:
    """Mean per-token KL(released || teacher) at ``gamma`` (PoE) or ``lam`` (ADS) = ``value``.

    Stored values are float32 or float16 (memory); the mixing and KL run in float64, a chunk of positions at a time.
    """
    v = torch.tensor(value, dtype=torch.float64)
    total = 0.0
    n = lp.teacher.shape[0]
    for a in range(0, n, chunk):
        # Renormalized in float64: float32 storage leaves sum(exp(t)) off 1 by ~1e-7,
        # which would otherwise show up as a KL floor of that size at gamma = 0.
        t = torch.log_softmax(lp.teacher[a: a + chunk].double(), dim=-1)
        if mode == "poe":
            mixed = poe_mix(t, torch.log_softmax(lp.proxy[a: a + chunk].double(), dim=-1), v)
        else:
            mixed = ads_tilt_derivative(t, lp.directional[a: a + chunk].double(), v)
        kl, _ = kl_and_agreement(mixed, t)
        total += float(kl.sum())
    return total / n


def prompt_kls(lp: PositionLogprobs, mode: str, value: float, tokens: int) -> torch.Tensor:
    """Mean KL per prompt (each trace contributes ``tokens`` consecutive positions)."""
    n = lp.teacher.shape[0] // tokens
    out = []
    for i in range(n):
        part = slice(i * tokens, (i + 1) * tokens)
        sub = PositionLogprobs(*(None if x is None else x[part] for x in lp.parts()))
        out.append(mean_kl(sub, mode, value))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def _seq_logprobs(model: torch.nn.Module, ids: list[int], start: int, vocab: int) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1: len(ids) - 1, :vocab]
    return torch.log_softmax(logits.double(), dim=-1)


def position_logprobs(ref: Any, traces: list[tuple[list[int], int]], mode: str,
                      store: torch.dtype = torch.float32) -> PositionLogprobs:
    """Log-probs at each completion position of ``traces`` ((token ids, completion start) pairs)."""
    from tqdm import tqdm

    from distillgame.plugins.ads_jvp import JvpProxyRunner

    vocab = min(ref._vocab(ref.teacher), ref._vocab(ref.proxy))
    jvp = JvpProxyRunner(ref.proxy, ref.ads_grad, 1, torch.device("cpu")) if mode == "ads" else None
    teacher, proxy, directional = [], [], []
    for ids, start in tqdm(traces, desc=f"calibrate {mode}", unit="trace", disable=len(traces) < 64):
        teacher.append(_seq_logprobs(ref.teacher, ids, start, vocab).to(store))
        if jvp is None:
            proxy.append(_seq_logprobs(ref.proxy, ids, start, vocab).to(store))
        else:
            directional.append(jvp.sequence(ids, start)[:, :vocab].to(store))
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return PositionLogprobs(cat(teacher), cat(proxy), cat(directional))


def bisect(fn, target: float, lo: float, hi: float, tol: float = 0.01, max_iter: int = 60,
           grow: bool = False) -> tuple[float, float, list[tuple[float, float]]]:
    """Smallest-bracket bisection of an increasing ``fn`` for ``fn(x) = target``; (x, fn(x), history)."""
    history: list[tuple[float, float]] = []
    f_hi = fn(hi)
    history.append((hi, f_hi))
    while f_hi < target:
        if not grow:
            raise ValueError(f"target {target} is above the reachable maximum {f_hi:.4g} at {hi}")
        lo, hi = hi, hi * 2.0
        f_hi = fn(hi)
        history.append((hi, f_hi))
        if hi > 1e6:
            raise ValueError(f"target {target} not reached (KL {f_hi:.4g} at {hi})")
    x, fx = hi, f_hi
    for _ in range(max_iter):
        x = 0.5 * (lo + hi)
        fx = fn(x)
        history.append((x, fx))
        if abs(fx - target) <= tol * target:
            break
        if fx < target:
            lo = x
        else:
            hi = x
    return x, fx, history


def write_tier(policy: Path, tier: str, defense: dict[str, Any]) -> None:
    """Replace the ``defense`` of ``[tiers.<tier>]`` in a TOML or YAML policy file (other text kept)."""
    text = policy.read_text()
    if policy.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
        data.setdefault("tiers", {}).setdefault(tier, {})["defense"] = defense
        policy.write_text(yaml.safe_dump(data, sort_keys=False))
        return
    inline = "{ " + ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in defense.items()) + " }"
    header = re.compile(rf"^\[tiers\.{re.escape(tier)}\]\s*$", re.M)
    m = header.search(text)
    if m is None:
        text = text.rstrip("\n") + f"\n\n[tiers.{tier}]\ndefense = {inline}\n"
    else:
        nxt = re.compile(r"^\[", re.M).search(text, m.end())
        end = nxt.start() if nxt else len(text)
        body = text[m.end():end]
        line = re.compile(r"^defense\s*=.*$", re.M)
        body = line.sub(f"defense = {inline}", body, count=1) if line.search(body) else f"\ndefense = {inline}" + body
        text = text[: m.end()] + body + text[end:]
    policy.write_text(text)
    # The file must still load as a policy.
    from distillgame.server.policy import load_policy

    loaded = load_policy(policy).tiers[tier].defense
    if loaded.mode != defense["mode"]:
        raise RuntimeError(f"writing {policy} failed: tier {tier} has mode {loaded.mode}")


def sample_traces(ref: Any, tokenizer: Any, prompts: list[list[int]], tokens: int, seed: int,
                  batch: int = 64) -> list[tuple[list[int], int]]:
    """Teacher-sampled continuations (temperature 1, ``tokens`` each): the contexts at which KL is measured.

    Batches of ``batch`` prompts, so the teacher's KV cache stays small for a thousand prompts.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[list[int], int]] = []
    for a in tqdm(range(0, len(prompts), batch), desc="sample traces", unit="batch", disable=len(prompts) <= batch):
        chunk = prompts[a: a + batch]
        ids, mask = models.left_padded(chunk, pad)
        with torch.no_grad():
            gen = ref.teacher.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                       top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad)
        out += [(list(p) + gen[i, ids.shape[1]:].tolist(), len(p)) for i, p in enumerate(chunk)]
    return out


def run_calibrate(args: Any, command: str = "") -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distillgame.plugins.ads_grad import load_gradient
    from distillgame.plugins.reference import ReferenceModels, load_causal_lm
    from distillgame.tasks import build_chat_messages, build_prompt, load_problems

    torch.set_num_threads(1)
    teacher = models.resolve(args.teacher, "teacher")
    proxy = models.resolve(args.proxy, "proxy")
    eps_ads = 1e-4
    grad = None
    if args.mode == "ads":
        if not args.ads_grad:
            raise SystemExit("--mode ads needs --ads-grad FILE")
        grad = load_gradient(args.ads_grad, load_causal_lm(proxy))
    ref = ReferenceModels(teacher, proxy, ads_grad=grad)
    tok = AutoTokenizer.from_pretrained(teacher)
    n = args.calib + args.holdout
    task = getattr(args, "task", "gsm-symbolic")
    problems = load_problems(task, "test", n=n, seed=0)
    prompts = []
    for p in problems:
        if getattr(args, "prompt_format", "chat") == "plain":  # base models such as the zoo's
            prompts.append(tok(build_prompt(p, task))["input_ids"])
            continue
        ids = tok.apply_chat_template(build_chat_messages(p, task), add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    traces = sample_traces(ref, tok, prompts, args.tokens, seed=0)
    store = _STORE[getattr(args, "store", "float32")]
    calib = position_logprobs(ref, traces[: args.calib], args.mode, store)
    hold = position_logprobs(ref, traces[args.calib:], args.mode, store)
    target = float(args.target_kl)
    if args.mode == "poe":
        value, kl_cal, hist = bisect(lambda g: mean_kl(calib, "poe", g), target, 0.0, 0.999, tol=args.tol)
        defense: dict[str, Any] = {"mode": "poe", "gamma": round(value, 6)}
    else:
        value, kl_cal, hist = bisect(lambda lam: mean_kl(calib, "ads", lam), target, 0.0, 0.01,
                                     tol=args.tol, grow=True)
        defense = {"mode": "ads", "lam": round(value, 6), "eps": eps_ads}
    per_prompt = prompt_kls(hold, args.mode, value, args.tokens)
    kl_hold = float(per_prompt.mean())
    # Prompts differ a lot (ADS on the zoo: per-prompt KL has a coefficient of
    # variation near 1), so the held-out mean is itself an estimate: its standard
    # error says how many prompts a 5% check needs.
    sem_hold = float(per_prompt.std() / len(per_prompt) ** 0.5) if len(per_prompt) > 1 else 0.0
    rel = abs(kl_hold - target) / target
    within = rel <= 0.05
    if args.policy is not None:
        if not args.tier:
            raise SystemExit("--policy needs --tier")
        write_tier(Path(args.policy), args.tier, defense)
        logger.info("wrote %s into tier %s of %s", defense, args.tier, args.policy)
    param = "gamma" if args.mode == "poe" else "lam"
    summary = (f"{args.mode}: {param} = {value:.6g} gives mean KL {kl_cal:.4g} nats/token on {args.calib} calibration "
               f"prompts ({calib.teacher.shape[0]} positions), {kl_hold:.4g} on {args.holdout} held-out prompts "
               f"({hold.teacher.shape[0]} positions, standard error {100 * sem_hold / target:.1f}% of the target): "
               f"{100 * rel:.1f}% from the target {target:g} "
               f"({'within' if within else 'NOT within'} 5%)")
    result = {"command": command, "mode": args.mode, "target_kl": target, param: value, "defense": defense, "kl_calibration": kl_cal,
              "kl_holdout": kl_hold, "kl_holdout_sem": sem_hold, "holdout_rel_error": rel, "within_tolerance": within,
              "bisection": [{"value": x, "kl": f} for x, f in hist], "calib_prompts": args.calib,
              "holdout_prompts": args.holdout, "tokens_per_prompt": args.tokens,
              "store": str(store).removeprefix("torch."),
              "task": task, "prompt_format": getattr(args, "prompt_format", "chat"),
              "teacher": teacher, "proxy": proxy, "summary": summary,
              "policy": str(args.policy) if args.policy else None, "tier": args.tier}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"calibrate_{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
