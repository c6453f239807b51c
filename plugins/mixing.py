"""The defenses' per-token math, shared by the engine processor and the oracle.

Pure tensor functions, no model and no engine: the processor calls them in
float32 on the engine's device, the reference oracle in float64.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable

import torch

MODES = ("none", "poe", "ads")
MODE_INDEX = {name: i for i, name in enumerate(MODES)}
EXTRA_ARGS_KEY = "distillgame"
# The flat form of the same fields, as vLLM's OpenAI server carries them in ``vllm_xargs``.
FLAT_PREFIX = "distillgame_"
FLAT_FIELDS = ("mode", "gamma", "lam", "eps")


@dataclass(frozen=True)
class Defense:
    """One request's defense, as carried in ``SamplingParams.extra_args`` (see :func:`parse_defense`)."""

    mode: str = "none"
    gamma: float = 0.0  # PoE weight on the proxy (eq. 5)
    lam: float = 0.0  # ADS tilt strength
    eps: float = 1e-4  # ADS finite-difference step

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def as_dict(self) -> dict[str, Any]:
        if self.mode == "poe":
            return {"mode": "poe", "gamma": self.gamma}
        if self.mode == "ads":
            return {"mode": "ads", "lam": self.lam, "eps": self.eps}
        return {"mode": "none"}


def _number(section: dict[str, Any], key: str, name: str) -> float:
    value = section.get(key)
    # bool is an int subclass; True as a gamma is a caller bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def flat_defense_args(defense: Defense) -> dict[str, Any]:
    """``defense`` in the flat form vLLM's OpenAI server carries (``vllm_xargs``): ``{"distillgame_mode": ...}``."""
    return {f"{FLAT_PREFIX}{key}": value for key, value in defense.as_dict().items()}


def parse_defense(extra_args: dict[str, Any] | None) -> Defense:
    """Validate and parse a request's defense; raise ``ValueError`` naming the bad parameter.

    Two forms: nested, ``{"distillgame": {"mode": "poe", "gamma": 0.65}}``
    (``SamplingParams`` built by our own code), and flat,
    ``{"distillgame_mode": "poe", "distillgame_gamma": 0.65}``: vLLM's OpenAI
    server types ``vllm_xargs`` as a flat dict of scalars, so the nested form
    cannot reach the engine through it. Both at once are refused rather than
    merged, so no second copy can sit beside the one a gateway wrote.
    """
    if not extra_args:
        return Defense()
    flat = {key: value for key, value in extra_args.items()
            if isinstance(key, str) and key.startswith(FLAT_PREFIX)}
    if flat:
        if EXTRA_ARGS_KEY in extra_args:
            first = sorted(flat)[0]
            raise ValueError(f"{first} and {EXTRA_ARGS_KEY} given together; send the defense in one form only")
        unknown = sorted(key for key in flat if key[len(FLAT_PREFIX):] not in FLAT_FIELDS)
        if unknown:
            known = ", ".join(FLAT_PREFIX + name for name in FLAT_FIELDS)
            raise ValueError(f"{unknown[0]} is not a defense parameter (known: {known})")
        section = {key[len(FLAT_PREFIX):]: value for key, value in flat.items()}
        return _parse_section(section, lambda key: FLAT_PREFIX + key)
    if EXTRA_ARGS_KEY not in extra_args:
        return Defense()
    section = extra_args[EXTRA_ARGS_KEY]
    if section is None:
        return Defense()
    if not isinstance(section, dict):
        raise ValueError(f"distillgame must be an object, got {type(section).__name__}")
    return _parse_section(section, lambda key: f"{EXTRA_ARGS_KEY}.{key}")


def _parse_section(section: dict[str, Any], name: Callable[[str], str]) -> Defense:
    """One defense from its fields; ``name`` spells a field as the caller sent it (for the error)."""
    mode = section.get("mode", "none")
    if mode not in MODES:
        raise ValueError(f"{name('mode')} must be one of {list(MODES)}, got {mode!r}")
    allowed = {"none": {"mode"}, "poe": {"mode", "gamma"}, "ads": {"mode", "lam", "eps"}}[mode]
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{name(unknown[0])} is not a parameter of mode {mode!r}")
    if mode == "poe":
        gamma = _number(section, "gamma", name("gamma"))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"{name('gamma')} must be in [0, 1], got {gamma}")
        return Defense("poe", gamma=gamma)
    if mode == "ads":
        lam = _number(section, "lam", name("lam"))
        if lam < 0.0:
            raise ValueError(f"{name('lam')} must be >= 0, got {lam}")
        eps = _number(section, "eps", name("eps")) if "eps" in section else 1e-4
        if eps <= 0.0:
            raise ValueError(f"{name('eps')} must be > 0, got {eps}")
        return Defense("ads", lam=lam, eps=eps)
    return Defense()


def poe_mix(teacher_logprobs: torch.Tensor, proxy_logprobs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 5 at token level: ``(1-gamma)*log p_teacher + gamma*log p_proxy`` (unnormalized).

    ``gamma`` broadcasts against the rows (shape ``[rows, 1]`` or a scalar).
    Where a log-probability is -inf and its weight is 0, the product is 0, not NaN.
    Two full-size buffers and in-place passes: this runs on every defended row
    of every engine step.
    """
    mixed = torch.mul(teacher_logprobs, 1.0 - gamma)
    # 0 * -inf is the only NaN source (log-probs are never NaN or +inf).
    torch.nan_to_num(mixed, nan=0.0, posinf=math.inf, neginf=-math.inf, out=mixed)
    proxy = torch.mul(proxy_logprobs, gamma)
    torch.nan_to_num(proxy, nan=0.0, posinf=math.inf, neginf=-math.inf, out=proxy)
    return mixed.add_(proxy)


def ads_tilt(
    teacher_logprobs: torch.Tensor,
    proxy_plus_logprobs: torch.Tensor,
    proxy_minus_logprobs: torch.Tensor,
    lam: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """ADS by central finite difference (sign as in the public reference code).

    ``teacher + lam/(2*eps) * (log p_proxy(theta+eps*g) - log p_proxy(theta-eps*g))``:
    the bracket approximates ``2*eps * <g, grad_theta log p_proxy(token)>``, so
    tokens whose likelihood gradient points along ``g`` (learning them would
    raise the downstream loss) gain mass and those that would lower it lose it.
    """
    diff = proxy_plus_logprobs - proxy_minus_logprobs
    # -inf - -inf is NaN for tokens both copies rule out; they stay ruled out.
    diff = torch.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0)
    return teacher_logprobs + (lam / (2.0 * eps)) * diff


def ads_tilt_derivative(teacher_logprobs: torch.Tensor, directional: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """ADS with the directional derivative itself: ``teacher + lam * <g, grad_theta log p_proxy>``.

    The limit of :func:`ads_tilt` as ``eps -> 0`` (``directional`` from
    :class:`~distillgame.plugins.ads_jvp.JvpProxyRunner`); ``eps`` plays no part.
    """
    directional = torch.nan_to_num(directional, nan=0.0, posinf=0.0, neginf=0.0)
    return teacher_logprobs + lam * directional


def all_finite(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool: every element of ``values`` is finite, in one reduction.

    A row's sum is NaN or infinite whenever one of its terms is (NaN and
    infinities propagate, opposite infinities make NaN), so summing rows
    misses nothing that ``isfinite(values).all()`` catches, without the
    full-size bool tensor (about 30x cheaper per engine step on CPUs). A sum
    of finite terms that overflows also reads as not finite: that errs on the
    side of failing the step.
    """
    return torch.isfinite(values.sum(dim=-1, dtype=torch.promote_types(values.dtype, torch.float32))).all()


def kl_and_agreement(released_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(released || teacher) at temperature 1 (eq. 1) and argmax agreement."""
    terms = torch.log_softmax(released_logits, dim=-1)
    q = terms.exp()
    terms.sub_(teacher_logprobs).mul_(q)
    # A token the release rules out (q = 0) adds nothing: 0 * -inf and 0 * NaN
    # (both -inf) become 0; one only the teacher rules out stays +inf.
    torch.nan_to_num(terms, nan=0.0, posinf=math.inf, neginf=-math.inf, out=terms)
    kl = terms.sum(dim=-1).clamp_min(0.0)
    agree = released_logits.argmax(dim=-1) == teacher_logprobs.argmax(dim=-1)
    return kl, agree


# ------------------------------------------------------------------ the engine's per-step forms
#
# The functions above are the definitions (the float64 oracle and the studies
# call them). The engine runs the same arithmetic on every defended row of
# every step, where a fresh [rows, vocab] tensor per operation costs more than
# the operation (page faults on CPUs: about 0.5 ms per 6 MB buffer) and
# ``argmax`` is ~15x slower than ``amax``. The forms below write into buffers
# the caller keeps (:class:`Workspace`) and read ``argmax`` off block maxima.
# tests/test_mixing.py holds them to the definitions.


class Workspace:
    """Float32 ``[rows, vocab]`` buffers reused from step to step, grown (to a power of two) when a step has more rows."""

    def __init__(self, vocab: int, device: torch.device | str, count: int = 4) -> None:
        self.vocab, self.device, self.count = vocab, torch.device(device), count
        self.rows = 0
        self.buffers: list[torch.Tensor] = []

    def get(self, rows: int) -> list[torch.Tensor]:
        if rows > self.rows:
            self.rows = 1 << max(0, rows - 1).bit_length()
            self.buffers = [torch.empty(self.rows, self.vocab, dtype=torch.float32, device=self.device)
                            for _ in range(self.count)]
        return [b[:rows] for b in self.buffers]


def log_softmax_into(logits: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """``out = log_softmax(logits, dim=-1)`` through ``scratch`` (both float32, the rows' shape)."""
    top = logits.amax(dim=-1, keepdim=True)
    torch.sub(logits, top, out=out)
    torch.exp(out, out=scratch)
    out.sub_(scratch.sum(dim=-1, keepdim=True).log_())


def poe_mix_into(teacher_logprobs: torch.Tensor, proxy: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor,
                 scratch: torch.Tensor, proxy_normalized: bool, gamma_max: float) -> None:
    """``out`` = :func:`poe_mix` of the teacher and ``log_softmax(proxy)``, with the teacher's -inf kept -inf.

    ``proxy`` is float32 and finite (the caller has checked): raw logits, whose
    log-sum-exp is subtracted as one number per row, or log-probabilities
    already (``proxy_normalized``), used as they are. ``gamma_max`` is the
    rows' largest gamma, known on the host: below 1, ``(1-gamma) * -inf`` is
    -inf by itself; at 1 it is NaN and the teacher's -inf entries are filled in.
    """
    if proxy_normalized:
        torch.mul(proxy, gamma, out=out)
    else:
        top = proxy.amax(dim=-1, keepdim=True)
        torch.sub(proxy, top, out=scratch)
        scratch.exp_()
        lse = scratch.sum(dim=-1, keepdim=True).log_().add_(top)
        torch.addcmul(-(gamma * lse), proxy, gamma, out=out)
    out.addcmul_(teacher_logprobs, 1.0 - gamma)
    if gamma_max >= 1.0:
        out.masked_fill_(torch.isneginf(teacher_logprobs), float("-inf"))


def argmax_rows(values: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``values.argmax(dim=-1)`` of a 2-D tensor (the first maximum on ties), from the maxima of column blocks."""
    rows, cols = values.shape
    if cols <= block:
        return values.argmax(dim=-1)
    full = cols // block * block
    tops = values[:, :full].unflatten(-1, (-1, block)).amax(dim=-1)
    if full < cols:
        tops = torch.cat([tops, values[:, full:].amax(dim=-1, keepdim=True)], dim=-1)
    which = tops.argmax(dim=-1)
    # The first block holding the row's maximum, then the first maximum inside it.
    starts = which * block
    cols_ = starts[:, None] + torch.arange(block, device=values.device)
    inside = values.gather(-1, cols_.clamp_max(cols - 1))
    inside.masked_fill_(cols_ >= cols, float("-inf"))
    return starts + inside.argmax(dim=-1)


def kl_and_agreement_into(released: torch.Tensor, teacher_logprobs: torch.Tensor, scratch: torch.Tensor,
                          scratch2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kl_and_agreement` through two float32 buffers of the rows' shape.

    With ``q = e / s``, ``e = exp(released - top)``: ``KL = sum(e * (released - teacher)) / s - top - log s``.
    """
    top = released.amax(dim=-1, keepdim=True)
    torch.sub(released, top, out=scratch)
    scratch.exp_()
    total = scratch.sum(dim=-1, keepdim=True)
    torch.sub(released, teacher_logprobs, out=scratch2)
    # As in kl_and_agreement: a token the release rules out (e = 0) adds nothing; one only the teacher rules out, +inf.
    scratch2.mul_(scratch).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    kl = (scratch2.sum(dim=-1, keepdim=True) / total - top - total.log()).squeeze(-1).clamp_min(0.0)
    return kl, argmax_rows(released) == argmax_rows(teacher_logprobs)
