"""``distillgame compare "PROMPT"``: the undefended and the defended answer side by side.

A provider's question before shipping a tier: what does this defense do to
my model's answers? This runs the teacher twice on the same prompt, once
plainly and once with a defense (a tier of a policy file, or ``--defense``),
and prints both completions next to each other, then the defended completion
token by token with KL(released || teacher) at temperature 1 (the eq. 1
budget, the quantity ``/metrics`` reports as ``distillgame_fidelity_kl_per_token``)
and whether the released argmax is the teacher's.

It runs the models with transformers on this machine, decoding with a KV
cache and mixing with the engine's own functions (``poe_mix``,
``ads_tilt_derivative``), so the released distribution is the one the engine
samples from (the engine is held to the same math within 1e-4 in the tests).
ADS takes the directional derivative from the float64 reference oracle, one
full forward per token: fine for a few dozen tokens, slow for hundreds.

Not for: serving or measuring a budget over many prompts (that is
``distillgame bench calibrate``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class TokenRow:
    """One released token of the defended completion."""

    token: str
    teacher_argmax: str
    kl: float  # KL(released || teacher) at this position, nats
    agree: bool  # released argmax == teacher argmax


@dataclass
class Comparison:
    prompt: str
    defense: dict[str, Any]
    kl_budget: float | None
    undefended: str
    defended: str
    tokens: list[TokenRow] = field(default_factory=list)

    @property
    def mean_kl(self) -> float:
        return sum(t.kl for t in self.tokens) / max(1, len(self.tokens))

    @property
    def agreement(self) -> float:
        return sum(t.agree for t in self.tokens) / max(1, len(self.tokens))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean_kl": self.mean_kl, "agreement": self.agreement}


class _Stepper:
    """Incremental next-token log-probs of one model (batch 1, its own KV cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.past: Any = None
        self.fed = 0

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        new = torch.tensor([ids[self.fed:]])
        out = self.model(input_ids=new, past_key_values=self.past, use_cache=True)
        self.past, self.fed = out.past_key_values, len(ids)
        return torch.log_softmax(out.logits[0, -1].double(), dim=-1)


def _pick(logprobs: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def compare(prompt: str, defense: dict[str, Any], *, teacher: str | None = None, proxy: str | None = None,
            ads_grad: str | None = None, max_tokens: int = 48, temperature: float = 0.0, seed: int = 0,
            raw: bool = False, kl_budget: float | None = None) -> Comparison:
    """Generate the undefended and the defended completion of ``prompt`` and score the defended one."""
    from transformers import AutoTokenizer

    from distillgame import models
    from distillgame.plugins.mixing import ads_tilt_derivative, kl_and_agreement, parse_defense, poe_mix
    from distillgame.plugins.reference import ReferenceModels

    d = parse_defense({"distillgame": defense})
    teacher_dir, proxy_dir = models.resolve(teacher, "teacher"), models.resolve(proxy, "proxy")
    grad = None
    if d.mode == "ads":
        from distillgame.plugins.ads_grad import load_gradient
        from distillgame.plugins.reference import load_causal_lm

        if not ads_grad:
            raise ValueError("an ADS defense needs --ads-grad FILE")
        grad = load_gradient(ads_grad, load_causal_lm(proxy_dir))
    ref = ReferenceModels(teacher_dir, proxy_dir, ads_grad=grad)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    if raw or not getattr(tok, "chat_template", None):
        prompt_ids = tok(prompt)["input_ids"]
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        prompt_ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    vocab = min(ref._vocab(ref.teacher), ref._vocab(ref.proxy))
    configured = getattr(ref.teacher.generation_config, "eos_token_id", None)
    stops = {tok.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])} - {None}

    def run(defended: bool) -> tuple[list[int], list[TokenRow]]:
        generator = torch.Generator().manual_seed(seed)
        t_step, p_step = _Stepper(ref.teacher), _Stepper(ref.proxy)
        ids, rows = list(prompt_ids), []
        for _ in range(max_tokens):
            t = torch.log_softmax(t_step.logprobs(ids)[:vocab], dim=-1)
            if not defended:
                released = t
            elif d.mode == "poe":
                released = poe_mix(t, torch.log_softmax(p_step.logprobs(ids)[:vocab], dim=-1),
                                   torch.tensor(d.gamma, dtype=torch.float64))
            else:
                released = ads_tilt_derivative(t, ref.directional(ids)[:vocab], torch.tensor(d.lam, dtype=torch.float64))
            released = torch.log_softmax(released, dim=-1)
            nxt = _pick(released, temperature, generator)
            if defended:
                kl, agree = kl_and_agreement(released.unsqueeze(0).clone(), t.unsqueeze(0))
                rows.append(TokenRow(tok.decode([nxt]), tok.decode([int(t.argmax())]), float(kl[0]), bool(agree[0])))
            ids.append(nxt)
            if nxt in stops:
                break
        return ids[len(prompt_ids):], rows

    plain, _ = run(False)
    defended_ids, rows = run(True) if d.mode != "none" else (plain, [])
    text = lambda ids: tok.decode([i for i in ids if i not in stops])  # noqa: E731
    return Comparison(prompt, d.as_dict(), kl_budget, text(plain), text(defended_ids), rows)


def render(c: Comparison, width: int | None = None) -> str:
    """The comparison as text: two columns, then the per-token table of the defended completion."""
    width = width or min(shutil.get_terminal_size((120, 20)).columns, 160)
    col = max(20, (width - 3) // 2)
    params = " ".join(f"{k}={v}" for k, v in c.defense.items() if k != "mode")
    title = f"defended ({c.defense['mode']} {params})".strip()
    left = [line for para in c.undefended.splitlines() or [""] for line in textwrap.wrap(para, col) or [""]]
    right = [line for para in c.defended.splitlines() or [""] for line in textwrap.wrap(para, col) or [""]]
    out = [f"prompt: {c.prompt}", "", f"{'undefended':<{col}} | {title}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(left), len(right))):
        out.append(f"{left[i] if i < len(left) else '':<{col}} | {right[i] if i < len(right) else ''}")
    if c.tokens:
        out += ["", "defended completion, per token:", f"{'#':>4}  {'released':<16} {'teacher argmax':<16} {'KL':>8}  agree"]
        for i, row in enumerate(c.tokens, 1):
            out.append(f"{i:>4}  {json.dumps(row.token)[:16]:<16} {json.dumps(row.teacher_argmax)[:16]:<16} "
                       f"{row.kl:>8.4f}  {'yes' if row.agree else 'no'}")
        budget = f" (tier budget {c.kl_budget:g})" if c.kl_budget is not None else ""
        out += ["", f"mean KL(released || teacher): {c.mean_kl:.4f} nats/token{budget}; "
                    f"argmax agreement: {100 * c.agreement:.1f}% ({sum(t.agree for t in c.tokens)}/{len(c.tokens)})"]
    return "\n".join(out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="print the undefended and the defended completion side by side")
    p.add_argument("prompt")
    p.add_argument("--policy", default=None, help="policy file whose tier to show (default: the server's default tier)")
    p.add_argument("--tier", default=None, help="tier of --policy (default: its anonymous tier)")
    p.add_argument("--defense", choices=["poe", "ads"], default=None, help="a defense by hand instead of a tier")
    p.add_argument("--gamma", type=float, default=None, help="PoE weight (with --defense poe)")
    p.add_argument("--lam", type=float, default=None, help="ADS strength (with --defense ads)")
    p.add_argument("--teacher", default=None, help="teacher folder or id (default: embedded SmolLM2)")
    p.add_argument("--proxy", default=None, help="proxy folder or id (default: embedded)")
    p.add_argument("--ads-grad", default=None, help="gradient file for ADS tiers")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default), else sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat template: complete the prompt as is")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_run)


def _defense_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], float | None]:
    from distillgame.server.policy import DEFAULT_GAMMA, DEFAULT_KL_BUDGET, load_policy

    if args.defense == "poe":
        return {"mode": "poe", "gamma": DEFAULT_GAMMA if args.gamma is None else args.gamma}, None
    if args.defense == "ads":
        return {"mode": "ads", "lam": 0.05 if args.lam is None else args.lam, "eps": 1e-4}, None
    if args.policy:
        policy = load_policy(args.policy)
        name = args.tier or policy.anonymous_tier
        if name not in policy.tiers:
            raise SystemExit(f"--tier: choose one of {sorted(policy.tiers)}")
        tier = policy.tiers[name]
        return tier.defense.public(), tier.kl_budget
    embedded = args.teacher is None and args.proxy is None
    return {"mode": "poe", "gamma": DEFAULT_GAMMA}, DEFAULT_KL_BUDGET if embedded else None


def _run(args: argparse.Namespace) -> int:
    defense, budget = _defense_from_args(args)
    result = compare(args.prompt, defense, teacher=args.teacher, proxy=args.proxy, ads_grad=args.ads_grad,
                     max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, raw=args.raw,
                     kl_budget=budget)
    sys.stdout.write((json.dumps(result.to_json(), indent=2) if args.json else render(result)) + "\n")
    return 0
