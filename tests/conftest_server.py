"""Helpers for the server tests: the defended server as a real process on a real socket.

``ServerProcess`` runs ``distillgame serve`` (vLLM's OpenAI server with the
policy middleware, under our supervisor); ``VllmServeProcess`` runs the same
server the way a provider adds the defense to a plain ``vllm serve``
(``python -m vllm.entrypoints.openai.api_server`` with ``--additional-config``
and ``--middleware`` only). Both read :data:`TEST_POLICY` and offer one
interface (``kind``, ``base_url``, ``port``, ``log_file``, ``workdir``,
``start``, ``wait_ready``, ``stop``). :func:`run_schemathesis` is the
generated-request runner of the hardening suite.

Not a pytest conftest (nothing here is collected or auto-loaded); test modules
import it and build their own fixtures from it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

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


ERROR_KEYS = {"message", "type", "param", "code"}
# Hypothesis's stream of generated cases is pinned by this seed (per operation),
# not by where the @given function happens to live.
SCHEMATHESIS_SEED = 17


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_text(extra_policy: str = "") -> str:
    """:data:`TEST_POLICY` with the limited key's digest filled in, and ``extra_policy`` appended."""
    digest = hashlib.sha256(LIMITED_KEY.encode()).hexdigest()
    return TEST_POLICY.replace("{limited_sha256}", digest) + extra_policy


@dataclass
class FrontEnd:
    """A server subprocess that reads :data:`TEST_POLICY` and where to reach it."""

    kind: ClassVar[str]

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_policy: str = ""  # more tiers and keys, appended to TEST_POLICY
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "serve.log"

    def write_policy(self) -> Path:
        path = self.workdir / "policy.toml"
        path.write_text(policy_text(self.extra_policy))
        return path

    def start(self, extra_args: list[str] | None = None) -> None:
        raise NotImplementedError

    def _launch(self, cmd: list[str], env: dict[str, str], new_session: bool = False) -> None:
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=new_session)

    def wait_ready(self, timeout: float = 300.0, want_health: int = 200) -> None:
        """Until ``/health`` answers ``want_health`` (503: the app is up, but the defense is not live)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2)
                if r.status_code == want_health and (want_health == 200 or "defense_not_live" in r.text):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

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
            self._kill()
            return self.proc.wait(timeout=30)

    def _kill(self) -> None:
        """SIGKILL the server and everything it started (the supervisor's server, the engine core)."""
        import psutil

        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def engine_core(self):
        """The live engine core process under this server (psutil), or None."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                    return p
        return None


@dataclass
class ServerProcess(FrontEnd):
    """A ``distillgame serve`` subprocess on the embedded models (unless ``extra_args`` say otherwise)."""

    kind: ClassVar[str] = "distillgame"

    @property
    def fault_file(self) -> Path:
        return self.workdir / "proxy-fault"

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
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
                   # A fresh compile cache: inductor's shared one can hold kernels built for another CPU's ISA.
                   TORCHINDUCTOR_CACHE_DIR=str(self.workdir / "inductor"))
        self._launch(cmd, env)

    def wait_health(self, want_ok: bool, timeout: float, poll_s: float = 0.25) -> list[str]:
        """Poll ``/health`` until it is 200 (``want_ok``) or not; every answer seen on the way, in order.

        An answer is the status code, or ``"refused"`` / ``"timeout"`` when the port gave none.
        """
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                status = str(httpx.get(f"{self.base_url}/health", timeout=2).status_code)
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError:
                status = "refused"
            seen.append(status)
            if (status == "200") == want_ok:
                return seen
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(poll_s)
        raise TimeoutError(f"/health did not turn {'200' if want_ok else 'non-200'} in {timeout}s: {seen[-5:]}")

    def restarts(self) -> int:
        """How many times the supervisor restarted the server (from its log)."""
        return self.log_file.read_text(errors="replace").count("the server exited with code")


@dataclass
class VllmServeProcess(FrontEnd):
    """``python -m vllm.entrypoints.openai.api_server`` with the README's drop-in flags: the proxy and the middleware.

    What else the defense needs (processed logprobs, the worker extension, no
    async scheduling) the package's vLLM plugin sets. ``defended=False``
    leaves out the processor's config but passes the worker extension and
    processed logprobs by hand, so that only the missing processor is wrong.
    ``dev_mode`` turns on vLLM's dev and RL routes, which the allowlist must
    refuse too.
    """

    kind: ClassVar[str] = "vllm"

    teacher: str | Path = ""
    proxy: str | Path = ""
    served_model_name: str = "tiny-teacher"
    max_model_len: int = 256
    kv_cache_bytes: int = 64 << 20
    ads_grad: Path | None = None
    defended: bool = True
    dev_mode: bool = False
    body_timeout_s: float | None = None  # the middleware's limits, from the environment as vllm serve passes none
    max_body_mb: float | None = None

    @classmethod
    def embedded(cls, workdir: Path, **options: Any) -> VllmServeProcess:
        """On the embedded pair, under the name and context ``distillgame serve`` gives it."""
        from distillgame import models

        return cls(workdir, teacher=models.resolve(None, "teacher"), proxy=models.resolve(None, "proxy"),
                   served_model_name=models.TEACHER_NAME, max_model_len=1024, kv_cache_bytes=256 << 20, **options)

    def start(self, extra_args: list[str] | None = None) -> None:
        policy = self.write_policy()
        env = dict(
            os.environ, DISTILLGAME_POLICY=str(policy), TOKENIZERS_PARALLELISM="false",
            # A fresh compile cache: inductor's shared one can hold kernels built for another CPU's ISA.
            TORCHINDUCTOR_CACHE_DIR=str(self.workdir / "inductor"),
        )
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.body_timeout_s is not None:
            env["DISTILLGAME_BODY_TIMEOUT_S"] = str(self.body_timeout_s)
        if self.max_body_mb is not None:
            env["DISTILLGAME_MAX_BODY_MB"] = str(self.max_body_mb)
        section: dict[str, str] = {"proxy": str(self.proxy)}
        if self.ads_grad is not None:
            section["ads_grad"] = str(self.ads_grad)
        if self.defended:
            defense = ["--additional-config", json.dumps({"distillgame": section})]
        else:
            defense = ["--logprobs-mode", "processed_logprobs",
                       "--worker-extension-cls", "distillgame.plugins.processor.DefenseWorkerExtension"]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.teacher),
               "--served-model-name", self.served_model_name, "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(self.max_model_len), "--max-num-seqs", "8",
               "--kv-cache-memory-bytes", str(self.kv_cache_bytes), *defense,
               "--middleware", "distillgame.server.gateway.DefensePolicy",
               "--host", "127.0.0.1", "--port", str(self.port), *(extra_args or [])]
        # Its own session, so that a kill also reaches the engine core process it spawns.
        self._launch(cmd, env, new_session=True)

    def _kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(server: FrontEnd, extra_args: list[str] | None = None, timeout: float = 400.0,
            want_health: int = 200) -> Iterator[FrontEnd]:
    """``server`` started and ready (``/health`` answers ``want_health``) for the block, stopped after it."""
    server.start(extra_args)
    try:
        server.wait_ready(timeout=timeout, want_health=want_health)
        yield server
    finally:
        server.stop()


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (``status`` if given) whose body is OpenAI's ``{"error": {message, type, param, code}}``; the error."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def vllm_app(model: str | Path) -> Any:
    """vLLM's OpenAI app as ``vllm serve MODEL`` builds it, without an engine (routes and OpenAPI schema only)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(model)])
    return build_app(args, ("generate",))


def vllm_allowed_operations(model: str | Path, served_model_name: str) -> list:
    """Schemathesis operations for what the middleware serves, from vLLM's own OpenAPI schema.

    The allowlisted routes only (not ``/metrics``, which is not JSON), and on
    the two generation routes only the allowlisted fields, with no extra
    properties, ``model`` the served one or absent and, on completions, a
    ``prompt`` (the alternative, ``prompt_embeds``, is refused): vLLM's schema describes
    every field it parses, and requests with others are refused by name before
    vLLM sees them (``test_gateway.py`` checks those refusals), so generating
    them would measure the refusal over and over instead of what reaches the engine.
    """
    import schemathesis

    from distillgame.server.gateway import CHAT, CHAT_FIELDS, COMPLETION_FIELDS, COMPLETIONS, ROUTES

    spec = vllm_app(model).openapi()
    spec["paths"] = {path: ops for path, ops in spec["paths"].items() if path in ROUTES and path != "/metrics"}
    schemas = spec["components"]["schemas"]
    for path, fields in ((CHAT, CHAT_FIELDS), (COMPLETIONS, COMPLETION_FIELDS)):
        media = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        name = media["schema"]["$ref"].rsplit("/", 1)[1]
        schema = copy.deepcopy(schemas[name])
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k in fields}
        schema["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [served_model_name]}, {"type": "null"}]}
        # vLLM's completions take prompt_embeds instead of a prompt; the middleware refuses those.
        schema["required"] = [k for k in schema.get("required", []) if k in fields] + (
            ["prompt"] if path == COMPLETIONS else [])
        schema["additionalProperties"] = False
        schemas[f"{name}Allowed"] = schema
        media["schema"] = {"$ref": f"#/components/schemas/{name}Allowed"}
    return [op.ok() for op in schemathesis.openapi.from_dict(spec).get_all_operations()]


@dataclass
class SchemathesisRun:
    """What a generated-request run saw: per operation, answers by status class and the commonest refusals."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)  # "status param-or-code" -> cases
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(sum(t.values()) for t in self.counts.values())

    def summary(self, **extra: Any) -> str:
        top = {op: dict(sorted(r.items(), key=lambda kv: -kv[1])[:6]) for op, r in self.refusals.items()}
        return json.dumps({**extra, "total": self.total, "by_operation": self.counts, "top_refusals": top},
                          sort_keys=True)


def run_schemathesis(operations: list, base_url: str, headers: dict[str, str], *, post_cases: int,
                     other_cases: int, seed: int = SCHEMATHESIS_SEED) -> SchemathesisRun:
    """Send generated requests for every operation and tally the answers.

    ``post_cases`` are shared out over the POST operations (each gets the same
    number, rounded up), ``other_cases`` go to each other operation. A failure
    is a 5xx, or a 4xx not in OpenAI's error shape. Each operation's case
    stream is fixed by ``seed`` and the operation's label.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    generating = [op for op in operations if op.method.upper() == "POST"]
    per_post = post_cases // max(len(generating), 1) + 1
    run = SchemathesisRun()

    def check(op: Any, case: Any) -> None:
        tally = run.counts.setdefault(op.label, {})
        r = case.call(base_url=base_url, headers=headers, timeout=120)
        cls = f"{r.status_code // 100}xx"
        tally[cls] = tally.get(cls, 0) + 1
        if r.status_code >= 500:
            run.failures.append(f"{op.label} -> {r.status_code}: {case.body!r:.300} {r.text[:300]}")
        elif r.status_code >= 400:
            try:
                err = assert_openai_error(r)
            except (AssertionError, ValueError) as exc:
                run.failures.append(f"{op.label} -> {r.status_code} not in OpenAI's shape: {exc} {r.text[:200]}")
                return
            why = f"{r.status_code} {err['param'] or err['message'][:60]}"
            refused = run.refusals.setdefault(op.label, {})
            refused[why] = refused.get(why, 0) + 1

    def cases(op: Any, n: int) -> Callable[[], None]:
        @hypothesis_seed(seed * 1_000_003 + zlib.crc32(op.label.encode()))
        @given(case=op.as_strategy())
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def one(case: Any) -> None:
            check(op, case)

        return one

    for op in operations:
        cases(op, per_post if op in generating else other_cases)()
    return run


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
