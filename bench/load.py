"""Streaming load generator for a running ``distillgame serve`` (or any OpenAI-compatible server).

``N`` concurrent clients stream completions (and chat completions) for a fixed
time; a share of the requests disconnect mid-stream at random. Every response
that runs to the end is checked on the wire: each ``data:`` event is JSON of
the right object type with one id, token logprobs arrive for every token, the
last choice event has a finish reason, usage matches the tokens seen, and the
stream ends with ``data: [DONE]``. Outcomes are counted by class (ok,
disconnected, 4xx, 5xx, error events, connection errors). The server's
resident memory (its process and the engine core's) is sampled after a
warm-up and after the load; the engine's running/waiting gauges must drain
back to 0.

Usage::

    distillgame serve --policy POLICY ... &            # or let --start run one
    python -m distillgame.bench.load --url http://127.0.0.1:8000 --key KEY --pid SERVER_PID
    python -m distillgame.bench.load --start --full    # 64 clients, 60 s, own server; results in bench/results/load

Not for: throughput benchmarking of the defense (the rates here are bounded
by a CPU test host) or hostile input (``tests/test_hardening.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

PROMPTS = [
    "Once upon a time",
    "The three primary colours are",
    "Write a short poem about the sea.",
    "Q: What is 12 times 7? A:",
    "List some fruits:",
    "The history of the printing press",
]


@dataclass
class LoadConfig:
    url: str
    key: str
    clients: int = 64
    duration_s: float = 60.0
    disconnect_frac: float = 0.2
    min_tokens: int = 4
    max_tokens: int = 24
    chat_frac: float = 0.25
    seed: int = 0
    request_timeout_s: float = 300.0


@dataclass
class LoadReport:
    config: dict[str, Any]
    outcomes: dict[str, int] = field(default_factory=dict)
    status_codes: dict[str, int] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def served(self) -> int:
        return self.outcomes.get("ok", 0)

    @property
    def disconnects(self) -> int:
        return self.outcomes.get("disconnected", 0)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(self.ttft_s)
        return {
            "served": self.served, "disconnects": self.disconnects, "outcomes": dict(self.outcomes),
            "status_codes": dict(self.status_codes), "malformed": len(self.malformed),
            "tokens": self.tokens, "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
            "ttft_p95_s": round(ttft[int(len(ttft) * 0.95)], 3) if ttft else None,
        }


class _Malformed(Exception):
    pass


async def _one_request(client: httpx.AsyncClient, cfg: LoadConfig, rng: random.Random, report: LoadReport,
                       started: list[bool] | None = None) -> str:
    chat = rng.random() < cfg.chat_frac
    max_tokens = rng.randint(cfg.min_tokens, cfg.max_tokens)
    disconnect_after = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < cfg.disconnect_frac else None
    prompt = rng.choice(PROMPTS)
    common = {"max_tokens": max_tokens, "temperature": 1.0, "stream": True,
              "stream_options": {"include_usage": True}, "seed": rng.randrange(1 << 30)}
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}
        obj = "chat.completion.chunk"
    else:
        # Token logprobs let the checker count tokens exactly against usage.
        path, body = "/v1/completions", {"prompt": prompt, "logprobs": 1, **common}
        obj = "text_completion"
    t0 = time.monotonic()
    async with client.stream("POST", path, json=body) as r:
        report.status_codes[str(r.status_code)] = report.status_codes.get(str(r.status_code), 0) + 1
        if started is not None:
            started[0] = True  # a transport error from here on cut a response short
        if r.status_code != 200:
            await r.aread()
            _check_error_shape(r.content)
            return f"{r.status_code // 100}xx"
        ids: set[str] = set()
        tokens = 0
        finish: str | None = None
        usage: dict | None = None
        done = False
        events = 0
        first_token_at: float | None = None
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                raise _Malformed(f"not an SSE data line: {line[:80]!r}")
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            if done:
                raise _Malformed("event after [DONE]")
            event = json.loads(data)
            if "error" in event:
                _check_error_shape(data.encode())
                return "error_event"
            if event.get("object") != obj:
                raise _Malformed(f"object {event.get('object')!r} != {obj!r}")
            ids.add(event["id"])
            events += 1
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice["index"] != 0:
                    raise _Malformed(f"choice index {choice['index']}")
                if finish is not None:
                    raise _Malformed("choice event after finish_reason")
                if chat:
                    tokens += 1 if (choice.get("delta") or {}).get("content") else 0
                else:
                    lp = choice.get("logprobs")
                    tokens += len(lp["tokens"]) if lp else 0
                    if lp and len(lp["token_logprobs"]) != len(lp["tokens"]):
                        raise _Malformed("logprobs lengths differ")
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if tokens and first_token_at is None:
                first_token_at = time.monotonic()
                report.ttft_s.append(first_token_at - t0)
            if disconnect_after is not None and tokens >= disconnect_after:
                return "disconnected"  # leaving the context manager closes the connection mid-stream
        if not done:
            raise _Malformed("stream ended without [DONE]")
        if len(ids) != 1:
            raise _Malformed(f"{len(ids)} ids in one stream")
        if finish not in ("stop", "length"):
            raise _Malformed(f"finish_reason {finish!r}")
        if usage is None:
            raise _Malformed("no usage chunk")
        if not chat and usage["completion_tokens"] != tokens:
            raise _Malformed(f"usage says {usage['completion_tokens']} tokens, stream carried {tokens}")
        if finish == "length" and usage["completion_tokens"] != max_tokens:
            raise _Malformed(f"finish 'length' after {usage['completion_tokens']} of {max_tokens}")
        if usage["completion_tokens"] > max_tokens:
            raise _Malformed("more tokens than max_tokens")
        report.tokens += usage["completion_tokens"]
        return "ok"


def _check_error_shape(raw: bytes) -> None:
    err = json.loads(raw)["error"]
    if not (isinstance(err.get("message"), str) and isinstance(err.get("type"), str)):
        raise _Malformed(f"error not in OpenAI shape: {raw[:200]!r}")


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Run ``cfg.clients`` streaming clients for ``cfg.duration_s`` seconds."""
    report = LoadReport(config=asdict(cfg))
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + cfg.duration_s
    limits = httpx.Limits(max_connections=cfg.clients + 8, max_keepalive_connections=cfg.clients)
    headers = {"Authorization": f"Bearer {cfg.key}"}

    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(cfg.request_timeout_s, connect=30)) as client:
        async def worker(i: int) -> None:
            rng = random.Random(cfg.seed * 100_003 + i)
            while time.monotonic() < deadline:
                started = [False]
                try:
                    outcome = await _one_request(client, cfg, rng, report, started)
                except (_Malformed, json.JSONDecodeError) as exc:
                    outcome = "malformed"
                    report.malformed.append(f"{type(exc).__name__}: {exc}")
                except httpx.TransportError as exc:
                    # Before the response started: the request never reached the app (e.g. refused at
                    # shutdown). After: a response was cut short, which counts against the server.
                    outcome = f"{'truncated' if started[0] else 'transport'}:{type(exc).__name__}"
                    await asyncio.sleep(0.1)  # a refusing server is not hammered in a tight loop
                outcomes[outcome] += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(cfg.clients)))
        report.wall_s = time.monotonic() - t0
    report.outcomes = dict(outcomes)
    return report


# ------------------------------------------------------------------ server side

def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the engine core is a child)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident memory per process of the server's tree, keyed ``name:pid`` (API server, engine core)."""
    import psutil

    proc = psutil.Process(pid)
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[f"{p.name()}:{p.pid}"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rpartition(" ")[2])
    return None


def wait_drained(url: str, timeout: float = 60.0) -> dict[str, float | None]:
    """Poll /metrics until the engine's running/waiting gauges and the HTTP in-flight gauge are 0."""
    deadline = time.monotonic() + timeout
    last: dict[str, float | None] = {}
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        last = {name: metric(text, name) for name in
                ("vllm:num_requests_running", "vllm:num_requests_waiting", "distillgame_http_requests_in_flight")}
        if all(v == 0 for v in last.values()):
            return last
        time.sleep(0.5)
    raise TimeoutError(f"engine still holds requests after {timeout:.0f}s: {last}")


def measure(cfg: LoadConfig, pid: int | None, warmup_s: float = 10.0) -> dict[str, Any]:
    """Warm up, sample RSS, run the load, drain, sample RSS again; everything in one dict."""
    warm = LoadConfig(**{**asdict(cfg), "duration_s": warmup_s, "seed": cfg.seed + 1})
    asyncio.run(run_load(warm))
    wait_drained(cfg.url)
    rss_before = rss_bytes(pid) if pid else None
    procs_before = rss_by_process(pid) if pid else {}
    series: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        # RSS over the run: growth that levels off (caches filling) vs. growth that keeps going (a leak).
        t0 = time.monotonic()
        while pid and not stop.wait(2.0):
            series.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        report = asyncio.run(run_load(cfg))
    finally:
        stop.set()
        sampler.join()
    gauges = wait_drained(cfg.url)
    time.sleep(1.0)
    rss_after = rss_bytes(pid) if pid else None
    out = {**report.summary(), "gauges_after": gauges, "rss_after_warmup_bytes": rss_before,
           "rss_after_load_bytes": rss_after, "malformed_examples": report.malformed[:10],
           "rss_by_process_before": procs_before, "rss_by_process_after": rss_by_process(pid) if pid else {},
           "rss_series": series, "config": asdict(cfg)}
    if rss_before and rss_after:
        out["rss_change"] = round(rss_after / rss_before - 1.0, 4)
    out["_ttft"] = report.ttft_s
    return out


def _write_results(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ttft = result.pop("_ttft", [])
    (out / "load.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    gib = 1 << 30
    md = [
        "# Load run", "",
        f"{result['config']['clients']} streaming clients for {result['config']['duration_s']:.0f} s, "
        f"{result['config']['disconnect_frac']:.0%} of requests disconnecting mid-stream.", "",
        "| figure | value |", "|---|---|",
        f"| requests served (complete, well-formed) | {result['served']} |",
        f"| disconnects mid-stream | {result['disconnects']} |",
        f"| outcomes | {json.dumps(result['outcomes'], sort_keys=True)} |",
        f"| HTTP status codes | {json.dumps(result['status_codes'], sort_keys=True)} |",
        f"| malformed responses | {result['malformed']} |",
        f"| tokens streamed (served requests) | {result['tokens']} ({result['tokens_per_s']} tok/s) |",
        f"| TTFT p50 / p95 | {result['ttft_p50_s']} s / {result['ttft_p95_s']} s |",
        f"| engine running / waiting / HTTP in flight after | {result['gauges_after']} |",
    ]
    if result.get("rss_after_warmup_bytes"):
        md.append(f"| RSS after warm-up -> after load | {result['rss_after_warmup_bytes'] / gib:.2f} GiB -> "
                  f"{result['rss_after_load_bytes'] / gib:.2f} GiB ({result['rss_change']:+.1%}) |")
    for name, before in sorted(result.get("rss_by_process_before", {}).items()):
        after = result.get("rss_by_process_after", {}).get(name)
        if after:
            md.append(f"| RSS {name.split(':')[0]} | {before / gib:.2f} GiB -> {after / gib:.2f} GiB "
                      f"({after / before - 1:+.1%}) |")
    (out / "load.md").write_text("\n".join(md) + "\n")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if ttft:
        ax.hist(ttft, bins=30)
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("requests")
    ax.set_title(f"{result['config']['clients']} streaming clients, {result['config']['duration_s']:.0f} s")
    if result.get("rss_series"):
        xs, ys = zip(*result["rss_series"])
        ax2.plot(xs, [y / gib for y in ys], marker=".")
        ax2.axhline(result["rss_after_warmup_bytes"] / gib, color="grey", ls="--", label="after warm-up")
        ax2.axhline(1.1 * result["rss_after_warmup_bytes"] / gib, color="red", ls=":", label="+10%")
        ax2.legend()
    ax2.set_xlabel("time into the load (s)")
    ax2.set_ylabel("server RSS, all processes (GiB)")
    fig.tight_layout()
    fig.savefig(out / "load_ttft.png", dpi=120)
    plt.close(fig)


_POLICY = """
[tiers.load]
defense = { mode = "poe", gamma = 0.65 }
[[keys]]
sha256 = "%s"
tier = "load"
"""


def _start_server(workdir: Path, port: int, key: str) -> subprocess.Popen:
    import hashlib

    return start_server(workdir, port, _POLICY % hashlib.sha256(key.encode()).hexdigest(),
                        ["--max-model-len", "1024", "--max-num-seqs", "32", "--memory-share", "0.1",
                         "--kv-cache-gib", "0.5"])


def start_server(workdir: Path, port: int, policy_text: str, args: list[str],
                 timeout_s: float = 900.0) -> subprocess.Popen:
    """``distillgame serve`` with ``policy_text`` on ``port`` (embedded models), once ``/health`` is 200."""
    policy = workdir / "policy.toml"
    policy.write_text(policy_text)
    cmd = [sys.executable, "-m", "distillgame.cli", "serve", "--policy", str(policy), "--port", str(port), *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    log = open(workdir / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {workdir / 'serve.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    proc.kill()
    raise TimeoutError("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="server base URL (without /v1)")
    p.add_argument("--key", default="sk-load")
    p.add_argument("--pid", type=int, default=None, help="server process id, for resident-memory figures")
    p.add_argument("--start", action="store_true", help="start a server (embedded default models) for the run")
    p.add_argument("--full", action="store_true", help="the full run: 64 clients for 60 s")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--disconnect-frac", type=float, default=0.2)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the baseline RSS sample")
    p.add_argument("--out", type=Path, default=Path("bench/results/load"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    clients = args.clients or 64
    duration = args.duration or (60.0 if args.full else 20.0)
    proc = None
    url, pid = args.url, args.pid
    if args.start:
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = _start_server(Path(tempfile.mkdtemp(prefix="load-")), port, args.key)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
    if url is None:
        p.error("give --url or --start")
    try:
        cfg = LoadConfig(url=url, key=args.key, clients=clients, duration_s=duration,
                         disconnect_frac=args.disconnect_frac)
        result = measure(cfg, pid, warmup_s=args.warmup)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    _write_results(result, args.out)
    logger.info("results in %s: %s", args.out, json.dumps({k: result[k] for k in ("served", "disconnects", "outcomes")}))
    bad = result["malformed"] or any(k.startswith("5") for k in result["status_codes"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
