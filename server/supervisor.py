"""Keeps one defended vLLM ``AsyncLLM`` alive for the HTTP front end.

The engine core is a separate process; when the defense fails inside it (the
proxy raises, runs out of memory) the core dies and every in-flight request
gets ``EngineDeadError``. That is the fail-closed path: no token leaves without
the defense. The supervisor notices the dead engine, reports it through
:attr:`EngineSupervisor.state` (``/health``), shuts it down and builds a fresh
one, while new requests get a 503.

Not for: HTTP, auth or request translation (see :mod:`distillgame.server.app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from distillgame.engine import EngineConfig, prepare_environment, verify_defense_live

logger = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    """What the supervisor needs to (re)build the engine."""

    config: EngineConfig
    # Explicit KV-cache size; on CPUs this bypasses the host-memory share
    # arithmetic that fails when the model itself is larger than the share.
    kv_cache_bytes: int | None = None
    restart_delay_s: float = 1.0
    fidelity_poll_s: float = 2.0


class EngineUnavailable(RuntimeError):
    """The engine is starting, restarting or has failed (HTTP 503)."""


@dataclass
class _State:
    status: str = "starting"  # starting | ready | failed | restarting | stopped
    reason: str | None = None
    restarts: int = 0
    since: float = field(default_factory=time.time)


class EngineSupervisor:
    """Owns the engine's life cycle; the app asks it for the live engine per request."""

    def __init__(
        self,
        options: EngineOptions,
        stat_loggers: list[Callable[..., Any]] | None = None,
        on_fidelity: Callable[[dict[str, dict[str, float]], int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.stat_loggers = stat_loggers or []
        self.on_fidelity = on_fidelity
        self.on_restart = on_restart
        self._restarting = False
        self.engine: Any = None
        self.tokenizer: Any = None
        self.model_path: str = ""
        self._state = _State()
        self._watch_task: asyncio.Task | None = None
        self._stopping = False
        self._fidelity_lock = asyncio.Lock()

    @property
    def status(self) -> str:
        return self._state.status

    def health(self) -> dict[str, Any]:
        return {
            "status": self._state.status,
            "reason": self._state.reason,
            "restarts": self._state.restarts,
            "since": self._state.since,
        }

    def _set(self, status: str, reason: str | None = None) -> None:
        self._state.status = status
        self._state.reason = reason
        self._state.since = time.time()
        log = logger.warning if status in ("failed", "restarting") else logger.info
        log("engine %s%s", status, f": {reason}" if reason else "")

    def mark_failed(self, reason: str) -> None:
        """Report a dead engine (seen by a request, or a failed first start); the watcher does any rebuild."""
        if self._state.status in ("ready", "starting"):
            self._set("failed", reason)

    def live_engine(self) -> Any:
        """The engine if it can take a request now, else :class:`EngineUnavailable`."""
        engine = self.engine
        if self._state.status != "ready" or engine is None or engine.errored:
            raise EngineUnavailable(f"engine {self._state.status}" + (f": {self._state.reason}" if self._state.reason else ""))
        return engine

    def _build(self) -> Any:
        prepare_environment()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = self.options.config.engine_kwargs()
        if self.options.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.options.kv_cache_bytes
        self.model_path = kwargs["model"]
        args = AsyncEngineArgs(**kwargs)
        return AsyncLLM.from_engine_args(args, stat_loggers=list(self.stat_loggers) or None)

    async def start(self) -> None:
        """Build the first engine (blocking until it is ready) and start watching it."""
        await self._start_engine()
        self._watch_task = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def _start_engine(self) -> None:
        # Construction blocks for tens of seconds (the engine core starts and
        # loads both models); a thread keeps /health answering meanwhile.
        # AsyncLLM starts its output loop lazily on the first request.
        engine = await asyncio.to_thread(self._build)
        try:
            # Not ready until every worker applies the defense (vLLM drops custom
            # processors silently, e.g. under speculative decoding).
            from distillgame.plugins.processor import status_rpc

            verify_defense_live(await asyncio.wait_for(engine.collective_rpc(status_rpc), timeout=120))
        except BaseException:
            await asyncio.to_thread(self._shutdown_engine, engine)
            raise
        self.engine = engine
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        self._set("ready")

    async def _watch(self) -> None:
        last_poll = 0.0
        while not self._stopping:
            await asyncio.sleep(0.25)
            engine = self.engine
            if engine is not None and engine.errored and not self._restarting:
                self._restarting = True
                try:
                    await self._restart(
                        self._state.reason
                        or "engine core died during a step (requests in flight were failed, no tokens released)"
                    )
                finally:
                    self._restarting = False
                continue
            if self.on_fidelity and time.monotonic() - last_poll >= self.options.fidelity_poll_s:
                last_poll = time.monotonic()
                await self.poll_fidelity()

    async def _restart(self, reason: str) -> None:
        self._set("failed", reason)
        self._state.restarts += 1
        if self.on_restart:
            self.on_restart()
        old, self.engine = self.engine, None
        if old is not None:
            await asyncio.to_thread(self._shutdown_engine, old)
        # Keep the failure visible on /health for a moment before rebuilding.
        await asyncio.sleep(self.options.restart_delay_s)
        while not self._stopping:
            self._set("restarting", reason)
            try:
                await self._start_engine()
                logger.info("engine rebuilt after failure (%d restarts)", self._state.restarts)
                return
            except Exception as exc:  # keep trying: the server stays up and answers 503
                logger.exception("engine rebuild failed")
                self._set("failed", f"{reason}; rebuild failed: {exc}")
                await asyncio.sleep(max(self.options.restart_delay_s, 5.0))

    @staticmethod
    def _shutdown_engine(engine: Any) -> None:
        try:
            engine.shutdown()
        except Exception:  # a dead core can fail its own shutdown; the process is gone either way
            logger.debug("engine shutdown raised", exc_info=True)

    async def poll_fidelity(self) -> None:
        """Read the processor's cumulative fidelity counters and hand them to ``on_fidelity``."""
        engine = self.engine
        if engine is None or engine.errored or self.on_fidelity is None:
            return
        async with self._fidelity_lock:
            try:
                from distillgame.plugins.processor import fidelity_rpc
            except ImportError:
                return
            try:
                per_worker = await asyncio.wait_for(engine.collective_rpc(fidelity_rpc), timeout=10)
            except Exception:
                logger.debug("fidelity rpc failed", exc_info=True)
                return
            self.on_fidelity(_sum_workers(per_worker), id(engine))

    async def stop(self) -> None:
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.engine is not None:
            await self.poll_fidelity()
            engine, self.engine = self.engine, None
            await asyncio.to_thread(self._shutdown_engine, engine)
        self._set("stopped")


def _sum_workers(per_worker: Any) -> dict[str, dict[str, float]]:
    total: dict[str, dict[str, float]] = {}
    for worker in per_worker or []:
        for mode, counts in (worker or {}).items():
            acc = total.setdefault(mode, {"tokens": 0.0, "kl_sum": 0.0, "argmax_agree": 0.0})
            for key in acc:
                acc[key] += float(counts.get(key, 0))
    return total
