"""Keeps vLLM's OpenAI server running for ``distillgame serve``: start, watch, restart, drain.

vLLM's server exits when its engine dies (its watchdog stops uvicorn once the
engine core has failed). That is the fail-closed path: the defense processor
failing inside the engine core ends the core, every request in flight gets an
error, and no token of it leaves without the defense. This supervisor is the
restart policy around it: a server that had become ready and then exited on
its own is started again after ``restart_delay_s``; meanwhile the port is
closed, so callers get a refused connection, never an answer. A server that
exits before it was ever ready (a bad flag, a model that does not load) is not
restarted: the supervisor exits with its code.

SIGTERM and SIGINT drain first: the middleware refuses new generation
requests (503, ``code: draining``) while those in flight finish, for up to the
drain time; then the server gets the signal (and vLLM's own
``--shutdown-timeout``). A drained stop exits 0.

Not for: HTTP or the policy (vLLM's app and :mod:`distillgame.server.gateway`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class ServerCommand:
    """How to start one server process and how to know it is ready."""

    argv: list[str]
    env: dict[str, str]
    health_url: str
    restart_delay_s: float = 1.0
    poll_s: float = 1.0
    # Drain on SIGTERM: touch drain_file (the middleware then refuses new generation requests), wait until
    # in_flight_url's distillgame_http_requests_in_flight is 0 or drain_s passed, then stop the server.
    drain_file: str | None = None
    metrics_url: str | None = None
    drain_s: float = 0.0


@dataclass
class _Run:
    proc: subprocess.Popen
    ready: threading.Event = field(default_factory=threading.Event)


class ServerSupervisor:
    """Runs :class:`ServerCommand` until stopped; restarts it after an exit it did not ask for."""

    def __init__(self, command: ServerCommand) -> None:
        self.command = command
        self.restarts = 0
        self._stopping = threading.Event()
        self._run: _Run | None = None
        self._lock = threading.Lock()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the running server to drain and exit; no restart follows."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        threading.Thread(target=self._drain_then_signal, args=(sig,), daemon=True).start()

    def _drain_then_signal(self, sig: int) -> None:
        with self._lock:
            run = self._run
        if run is None or run.proc.poll() is not None:
            return
        if self.command.drain_file and run.ready.is_set():
            open(self.command.drain_file, "w").close()
            deadline = time.monotonic() + self.command.drain_s
            while time.monotonic() < deadline and run.proc.poll() is None and self._in_flight() != 0:
                time.sleep(0.25)
        if run.proc.poll() is None:
            run.proc.send_signal(sig)

    def _in_flight(self) -> float | None:
        """The middleware's open generation requests, from /metrics (None if unreadable)."""
        if not self.command.metrics_url:
            return None
        try:
            with urllib.request.urlopen(self.command.metrics_url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("distillgame_http_requests_in_flight "):
                        return float(line.rsplit(" ", 1)[1])
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return None

    def run(self) -> int:
        """Serve until stopped (0) or until a server that never became ready exits (its code)."""
        previous = {sig: signal.signal(sig, lambda s, _f: self.stop(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stopping.is_set():
                run = self._start()
                code = run.proc.wait()
                self._reap(run)
                if self._stopping.is_set():
                    logger.info("server stopped (exit code %s)", code)
                    return 0
                if not run.ready.is_set():
                    logger.error("the server exited with code %s before it was ready; not restarting", code)
                    return code or 1
                self.restarts += 1
                logger.error("the server exited with code %s (its engine failed or it was killed); restart %d in "
                             "%.0f s, connections are refused meanwhile", code, self.restarts,
                             self.command.restart_delay_s)
                self._stopping.wait(self.command.restart_delay_s)
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self) -> _Run:
        # Its own process group, so that what it leaves behind (the engine core) can be reaped with it,
        # and a SIGTERM from the kernel if this supervisor dies, so it never serves unsupervised.
        # Not its own session: where Linux groups CPU time by session (sched_autogroup_enabled=1, the
        # default on desktop and many server kernels), a server in a session of its own held its streamed
        # tokens back for 2-3 s at a time at concurrency 8 (59-64 of 64 streams; none in our session).
        proc = subprocess.Popen(self.command.argv, env=self.command.env, process_group=0,
                                preexec_fn=_terminate_with_parent)
        run = _Run(proc)
        with self._lock:
            self._run = run
        threading.Thread(target=self._watch_ready, args=(run,), daemon=True).start()
        return run

    def _watch_ready(self, run: _Run) -> None:
        while run.proc.poll() is None and not self._stopping.is_set():
            try:
                with urllib.request.urlopen(self.command.health_url, timeout=5) as r:
                    if r.status == 200:
                        run.ready.set()
                        logger.info("server ready (pid %d)", run.proc.pid)
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(self.command.poll_s)

    @staticmethod
    def _reap(run: _Run) -> None:
        """Kill whatever the exited server left in its process group (an engine core that outlived it)."""
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux for a SIGTERM when the supervisor dies (no-op elsewhere)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass
