"""Prometheus metrics of the defense (prefix ``distillgame_``), served on vLLM's ``/metrics``.

Requests by tier, defense mode, endpoint and outcome; generation requests
open at the HTTP layer; and the fidelity the defense processor measures
inside the engine: KL(released || teacher) per token (eq. 1) and
teacher-argmax agreement, by mode. The processor's counters are cumulative
per engine; they are turned into counter increments here so that a new
engine does not double count them.

Not for: vLLM's own metrics (latency, tokens, queue: its ``vllm:`` families
on the same page).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest



class ServerMetrics:
    """One registry per server, so tests and several apps in one process don't collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distillgame_requests", "Generation requests by tier, defense mode, endpoint and outcome",
            ["tier", "mode", "endpoint", "status"], registry=r,
        )
        self.in_flight = Gauge("distillgame_http_requests_in_flight", "Generation requests open at the HTTP layer", registry=r)
        self.fidelity_tokens = Counter(
            "distillgame_fidelity_tokens", "Defended tokens the processor measured", ["mode"], registry=r
        )
        self.fidelity_kl = Counter(
            "distillgame_fidelity_kl_nats", "Sum of per-token KL(released || teacher), eq. 1", ["mode"], registry=r
        )
        self.fidelity_agree = Counter(
            "distillgame_fidelity_argmax_agree_tokens", "Tokens where released and teacher argmax agree",
            ["mode"], registry=r,
        )
        self.fidelity_kl_per_token = Gauge(
            "distillgame_fidelity_kl_per_token", "Cumulative KL(released || teacher) per defended token",
            ["mode"], registry=r,
        )
        self.fidelity_argmax_agreement = Gauge(
            "distillgame_fidelity_argmax_agreement", "Cumulative share of tokens agreeing with the teacher argmax",
            ["mode"], registry=r,
        )
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, float]] = {}
        self._engine_id: int | None = None

    def record_fidelity(self, totals: dict[str, dict[str, float]], engine_id: int) -> None:
        """Turn one engine's cumulative counters into increments since the last poll."""
        with self._lock:
            if engine_id != self._engine_id:
                # A rebuilt engine starts its counters at zero.
                self._engine_id = engine_id
                self._last = {}
            for mode, counts in totals.items():
                last = self._last.get(mode, {"tokens": 0.0, "kl_sum": 0.0, "argmax_agree": 0.0})
                d_tokens = counts.get("tokens", 0.0) - last["tokens"]
                d_kl = counts.get("kl_sum", 0.0) - last["kl_sum"]
                d_agree = counts.get("argmax_agree", 0.0) - last["argmax_agree"]
                if d_tokens > 0:
                    self.fidelity_tokens.labels(mode).inc(d_tokens)
                    self.fidelity_kl.labels(mode).inc(max(d_kl, 0.0))
                    self.fidelity_agree.labels(mode).inc(max(d_agree, 0.0))
                self._last[mode] = {k: float(counts.get(k, 0.0)) for k in ("tokens", "kl_sum", "argmax_agree")}
                tokens = self.fidelity_tokens.labels(mode)._value.get()
                if tokens > 0:
                    self.fidelity_kl_per_token.labels(mode).set(self.fidelity_kl.labels(mode)._value.get() / tokens)
                    self.fidelity_argmax_agreement.labels(mode).set(
                        self.fidelity_agree.labels(mode)._value.get() / tokens
                    )

    def render(self) -> bytes:
        return generate_latest(self.registry)
