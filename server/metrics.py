"""Prometheus metrics of the defended server (prefix ``distillgame_``).

Request and token counters by tier and defense mode, latency histograms by
mode, the engine's running/waiting requests (from vLLM's scheduler stats via
a stat-logger hook), and the fidelity the defense processor measures inside
the engine: KL(released || teacher) per token (eq. 1) and teacher-argmax
agreement, by mode. The processor's counters are cumulative per engine; they
are turned into counter increments here so restarts do not lose or double
count them.

Not for: vLLM's own metrics (the engine runs with its stat loggers off).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """One registry per server, so tests and several apps in one process don't collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distillgame_requests", "Generation requests by tier, defense mode, endpoint and outcome",
            ["tier", "mode", "endpoint", "status"], registry=r,
        )
        self.prompt_tokens = Counter(
            "distillgame_prompt_tokens", "Prompt tokens processed", ["tier", "mode"], registry=r
        )
        self.generation_tokens = Counter(
            "distillgame_generation_tokens", "Tokens released to callers", ["tier", "mode"], registry=r
        )
        self.ttft = Histogram(
            "distillgame_time_to_first_token_seconds", "Time from arrival to the first released token",
            ["mode"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "distillgame_time_per_output_token_seconds", "Mean time per released token after the first",
            ["mode"], buckets=_TPOT_BUCKETS, registry=r,
        )
        self.running = Gauge("distillgame_requests_running", "Requests the engine is decoding", registry=r)
        self.waiting = Gauge("distillgame_requests_waiting", "Requests queued in the engine", registry=r)
        self.in_flight = Gauge("distillgame_http_requests_in_flight", "Generation requests open at the HTTP layer", registry=r)
        self.engine_up = Gauge("distillgame_engine_up", "1 when the engine takes requests", registry=r)
        self.engine_restarts = Counter("distillgame_engine_restarts", "Engine rebuilds after a failure", registry=r)
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

    def engine_restarted(self) -> None:
        """Count a rebuild and clear the dead engine's queue gauges.

        The gauges are only written when an engine steps; without this they
        would keep the dead engine's last counts until the new one's first step.
        """
        self.engine_restarts.inc()
        self.running.set(0)
        self.waiting.set(0)

    def stat_logger_factory(self) -> Any:
        """A vLLM per-engine stat-logger factory that feeds the running/waiting gauges."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        metrics = self

        class _SchedulerGauges(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    metrics.running.set(scheduler_stats.num_running_reqs)
                    metrics.waiting.set(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs)

            def log_engine_initialized(self) -> None:
                pass

        return _SchedulerGauges

    def render(self) -> bytes:
        return generate_latest(self.registry)
