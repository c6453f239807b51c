"""Helpers for the server tests: run ``distillgame serve`` as a real process on a real socket.

Not a pytest conftest (nothing here is collected or auto-loaded); test modules
import it and build their own session fixtures from it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# A policy with a tier per behaviour the tests need. Keys are plain here (hashed at load).
TEST_POLICY = """
[tiers.standard]
defense = { mode = "poe", gamma = 0.65 }
allow_logprobs = true
max_top_logprobs = 5

[tiers.open]
defense = { mode = "none" }

[tiers.capped]
defense = { mode = "poe", gamma = 0.65 }
max_tokens = 3
allow_logprobs = false

[tiers.limited]
defense = { mode = "poe", gamma = 0.65 }
requests_per_minute = 2

[[keys]]
key = "sk-test-standard"
tier = "standard"

[[keys]]
key = "sk-test-open"
tier = "open"

[[keys]]
key = "sk-test-capped"
tier = "capped"

[[keys]]
sha256 = "{limited_sha256}"
tier = "limited"
"""
LIMITED_KEY = "sk-test-limited"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``distillgame serve`` subprocess and where to reach it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_policy: str = ""  # more tiers and keys, appended to TEST_POLICY
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fault_file(self) -> Path:
        return self.workdir / "proxy-fault"

    @property
    def log_file(self) -> Path:
        return self.workdir / "serve.log"

    def write_policy(self) -> Path:
        import hashlib

        path = self.workdir / "policy.toml"
        digest = hashlib.sha256(LIMITED_KEY.encode()).hexdigest()
        path.write_text(TEST_POLICY.replace("{limited_sha256}", digest) + self.extra_policy)
        return path

    def start(self, extra_args: list[str] | None = None) -> None:
        policy = self.write_policy()
        cmd = [
            sys.executable, "-m", "distillgame.cli", "serve",
            "--policy", str(policy), "--host", "127.0.0.1", "--port", str(self.port),
            # float32 so returned logprobs can be held to the float64 oracle at 1e-4.
            "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--memory-share", "0.1", "--kv-cache-gib", "0.25",
            "--fault-file", str(self.fault_file), "--drain-timeout", "60",
            *(extra_args or []),
        ]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", VLLM_USE_V2_MODEL_RUNNER="0")
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_health(self, want_ok: bool, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2)
                last = r.json()
                if (r.status_code == 200) == want_ok:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"/health did not turn {'200' if want_ok else 'non-200'} in {timeout}s: {last}")

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must match exactly those given)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_part = head.partition("{")
        if metric != name:
            continue
        found = dict(
            kv.split("=", 1) for kv in label_part.rstrip("}").split(",") if "=" in kv
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_part = head.partition("{")
        if metric != name:
            continue
        found = {k: v.strip('"') for k, v in (kv.split("=", 1) for kv in label_part.rstrip("}").split(",") if "=" in kv)}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total
