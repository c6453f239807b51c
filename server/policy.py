"""Who gets which defense: API keys, tiers and their limits.

The provider writes a policy file (TOML or YAML); the server turns the
caller's API key into a :class:`Tier`, and the tier alone fixes the defense
that goes into ``SamplingParams.extra_args``. Nothing a caller sends can
choose or weaken it.

Keys are stored as SHA-256 digests (a plain ``key`` in the file is hashed at
load time), compared with :func:`hmac.compare_digest` against every entry, and
never logged. Without a policy file every request is anonymous and gets the
default PoE defense of the embedded models, calibrated to a stated per-token
KL budget (:data:`DEFAULT_KL_BUDGET`).

Not for: HTTP handling (see :mod:`distillgame.server.app`) or the defense math
(see :mod:`distillgame.plugins.mixing`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
import tomllib
from collections import deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The embedded pair's calibrated default tier lives with the pair (distillgame.models).
from distillgame.models import DEFAULT_GAMMA, DEFAULT_KL_BUDGET  # noqa: F401 (re-exported)
from distillgame.plugins.mixing import Defense, flat_defense_args, parse_defense

DEFAULT_TIER = "default"
# Where the policy file's path comes from when the policy runs as middleware in
# vLLM's own server (``vllm serve --middleware``), which passes no arguments.
POLICY_ENV = "DISTILLGAME_POLICY"
# Request fields whose only purpose is to reach engine internals (the defense's
# extra_args, processors, hard masks that reach the teacher's logits before the
# mix, KV transfer): both front ends refuse them and say why.
ENGINE_FIELDS = frozenset(
    {"vllm_xargs", "extra_args", "defense", "distillgame", "logits_processors", "sampling_params",
     "logit_bias", "allowed_token_ids", "bad_words", "prompt_embeds", "kv_transfer_params"}
)


class DefenseSpec(BaseModel):
    """A tier's defense, by the paper's names: ``poe`` uses gamma, ``ads`` uses lam and eps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "poe", "ads"]
    gamma: float | None = None
    lam: float | None = None
    eps: float | None = None

    @model_validator(mode="after")
    def _check(self) -> DefenseSpec:
        # Same validation as the engine's processor, so a bad file fails at load, not per request.
        self.to_defense()
        return self

    def to_defense(self) -> Defense:
        section: dict[str, Any] = {"mode": self.mode}
        for name in ("gamma", "lam", "eps"):
            value = getattr(self, name)
            if value is not None:
                section[name] = value
        return parse_defense({"distillgame": section})

    def extra_args(self) -> dict[str, Any]:
        """What the server puts in ``SamplingParams.extra_args`` for this tier."""
        return {"distillgame": self.to_defense().as_dict()}

    def vllm_xargs(self) -> dict[str, Any]:
        """The same defense in the flat form vLLM's OpenAI server carries to ``extra_args``."""
        return flat_defense_args(self.to_defense())

    def public(self) -> dict[str, Any]:
        return self.to_defense().as_dict()


class Tier(BaseModel):
    """A class of callers: one defense and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    defense: DefenseSpec
    max_tokens: int | None = Field(default=None, gt=0, description="cap on generated tokens per choice")
    requests_per_minute: int | None = Field(default=None, gt=0)
    allow_logprobs: bool = True
    max_top_logprobs: int = Field(default=20, ge=0, le=20)
    kl_budget: float | None = Field(
        default=None, ge=0,
        description="nats/token: the mean KL(released || teacher) the defense was calibrated to (shown, not enforced)")

    @property
    def defended(self) -> bool:
        return self.defense.mode != "none"

    def logprobs_refusal(self, k: int) -> str | None:
        """Why a request for ``k`` top logprobs per token is refused for this tier, or None."""
        if not self.allow_logprobs:
            return f"logprobs are not allowed for tier '{self.name}'"
        if k > self.max_top_logprobs:
            return f"at most {self.max_top_logprobs} top logprobs for tier '{self.name}'"
        return None

    def public(self) -> dict[str, Any]:
        """The caller's view of its tier (``GET /v1/defense``): no keys, no hashes."""
        return {
            "tier": self.name,
            **self.defense.public(),
            "kl_budget": self.kl_budget,
            "max_tokens": self.max_tokens,
            "requests_per_minute": self.requests_per_minute,
            "allow_logprobs": self.allow_logprobs,
            "max_top_logprobs": self.max_top_logprobs,
            "prompt_logprobs": False,
        }


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str
    key: str | None = Field(default=None, repr=False)
    sha256: str | None = Field(default=None, repr=False)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("sha256 must be 64 hex digits")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("each key entry needs exactly one of 'key' or 'sha256'")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        return hash_key(self.key or "")


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class AuthError(Exception):
    """Missing or unknown API key (HTTP 401)."""


class Policy(BaseModel):
    """Tiers, the keys that select them, and the tier for callers without a key."""

    model_config = ConfigDict(extra="forbid")

    tiers: dict[str, Tier]
    keys: list[KeyEntry] = Field(default_factory=list)
    anonymous_tier: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if not self.tiers:
            raise ValueError("a policy needs at least one tier")
        # Tier names come from the table keys; keep them on the objects for metrics and /v1/defense.
        self.tiers = {name: tier.model_copy(update={"name": name}) for name, tier in self.tiers.items()}
        for entry in self.keys:
            if entry.tier not in self.tiers:
                raise ValueError(f"key entry names unknown tier {entry.tier!r}")
        if self.anonymous_tier is not None and self.anonymous_tier not in self.tiers:
            raise ValueError(f"anonymous_tier names unknown tier {self.anonymous_tier!r}")
        if not self.keys and self.anonymous_tier is None:
            raise ValueError("a policy without keys needs an anonymous_tier")
        self._digests = [(entry.digest(), entry.tier) for entry in self.keys]
        return self

    @property
    def requires_key(self) -> bool:
        return self.anonymous_tier is None

    def authenticate(self, api_key: str | None) -> Tier:
        """The caller's tier; raises :class:`AuthError` for a missing or unknown key.

        Every stored digest is compared (no early exit), so the time taken
        does not depend on which entry, if any, matched.
        """
        if not api_key or (not self._digests and self.anonymous_tier is not None):
            # Without any keys configured, SDKs that always send one (e.g. "none") are anonymous callers.
            if self.anonymous_tier is None:
                raise AuthError("missing API key")
            return self.tiers[self.anonymous_tier]
        presented = hash_key(api_key)
        found: str | None = None
        for digest, tier in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = tier
        if found is None:
            raise AuthError("invalid API key")
        return self.tiers[found]


def bearer_key(authorization: str | None) -> str | None:
    """The API key of an ``Authorization: Bearer <key>`` header, or None."""
    auth = authorization or ""
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    return key or None


def identify(policy: Policy, authorization: str | None) -> tuple[Tier, str]:
    """The caller's tier and rate-limit bucket (a digest prefix of the key, never the key itself).

    Raises :class:`AuthError` for a missing or unknown key.
    """
    key = bearer_key(authorization)
    tier = policy.authenticate(key)
    ident = hash_key(key).hex()[:16] if key else f"anonymous:{tier.name}"
    return tier, ident


def default_policy(gamma: float = DEFAULT_GAMMA, kl_budget: float | None = DEFAULT_KL_BUDGET) -> Policy:
    """No file: no auth, every request defended with PoE at ``gamma``.

    ``kl_budget`` is what ``/v1/defense`` reports beside ``gamma``; pass None
    when ``gamma`` was not calibrated for the served pair.
    """
    return Policy(
        tiers={DEFAULT_TIER: Tier(defense=DefenseSpec(mode="poe", gamma=gamma), kl_budget=kl_budget)},
        anonymous_tier=DEFAULT_TIER,
    )


def load_policy(path: str | Path | None) -> Policy:
    """Read a policy from a ``.toml`` or ``.yaml``/``.yml`` file; ``None`` gives :func:`default_policy`."""
    if path is None:
        return default_policy()
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = tomllib.loads(text)
    return Policy.model_validate(data)


def policy_from_env() -> Policy:
    """The policy named by ``$DISTILLGAME_POLICY``; unset gives :func:`default_policy`, as ``serve`` without ``--policy``."""
    return load_policy(os.environ.get(POLICY_ENV) or None)


class RateLimiter:
    """Requests per minute per caller, over a sliding 60 s window."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, caller: str, limit: int | None, now: float | None = None) -> bool:
        if limit is None:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._seen.setdefault(caller, deque())
            while seen and now - seen[0] >= self.window_s:
                seen.popleft()
            if len(seen) >= limit:
                return False
            seen.append(now)
            return True

    def admit(self, caller: str, limit: int | None) -> int | None:
        """None if ``caller`` may go ahead, else whole seconds to wait (at least 1, for Retry-After)."""
        if self.allow(caller, limit):
            return None
        return math.ceil(self.retry_after(caller)) or 1

    def retry_after(self, caller: str, now: float | None = None) -> float:
        """Seconds until ``caller``'s oldest request in the window leaves it (0 if none)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._seen.get(caller)
            if not seen:
                return 0.0
            return max(0.0, self.window_s - (now - seen[0]))
