"""Defense overhead through the HTTP server, against its physical limit.

``distillgame bench overhead`` starts ``distillgame serve`` (or uses ``--url``),
with a policy of three tiers, ``none`` / ``poe`` / ``ads``, each reached by its
own API key, and drives it with async ``openai`` clients at several
concurrencies. Modes run interleaved in rounds (the order rotates each round),
so drift in the machine's load hits every mode alike. Per mode and concurrency
it reports output tokens/s, TTFT and TPOT p50/p99 and the time-cost ratio to the
undefended mode of the same run.

The limit: a second server serves the proxy alone, undefended, with the same
harness, as one more arm of the same interleaved rounds (``PROXY_ARM``); its
tokens/s against the teacher's gives ``t_p / t_t`` per concurrency, and per
round, and the physical limit of the ratio is ``1 + t_p/t_t`` for PoE
(one proxy forward per step) and ``1 + 2 t_p/t_t`` for ADS (two perturbed
proxies). ``(ratio - 1) / (t_p/t_t)`` is the normalized overhead (the paper's
Table 1: 1.49 for PoE, 4.5 for ADS).

Output length: requests use the raw completions endpoint (as before the
server took vLLM's ``ignore_eos``, so that runs stay comparable) with a long narrative prompt, sampling at temperature 1 with a seed,
and ``max_tokens``; outputs that end early are counted by their real length
(every rate here is per generated token, from the usage the server reports).

Where the proxy runs (``--proxy-runners``): one server per runner, alive
together and measured in the same interleaved rounds. ``transformers`` runs
PoE's proxy beside the engine with its own dense KV cache, for defended rows
only; ``vllm`` runs it as a vLLM model with the teacher, its KV in the
engine's paged cache, on every scheduled token (:mod:`distillgame.plugins.paged_proxy`).
Arms of the second are named ``MODE@vllm``. On ``vllm`` a proxy that is an
early exit of the teacher (the embedded one) reads the teacher's own trunk
(:mod:`distillgame.plugins.early_exit`); ``vllm-separate`` runs the same proxy
on vLLM's layers as a model of its own (``--no-shared-trunk``), and ``plain``
is vLLM's own server on the teacher, with no defense in the engine (its one
arm is ``none@plain``). The undefended baseline of every ratio is ``none@plain``
where that server runs, else the ``none`` tier of the transformers server (the
teacher alone, with the processor's bookkeeping); the proxy-alone server runs
on transformers, so ``t_p`` is the proxy alone.

Not for: the reference (HF ``generate``) comparison, see
:mod:`distillgame.bench.reference_hf`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("none", "poe", "ads")
RUNNERS = ("transformers", "vllm", "vllm-separate", "plain")
PLAIN = "plain"
PAPER_NORMALIZED = {"poe": 1.49, "ads": 4.5}
PAPER_RATIO = {"poe": 1.64, "ads": 2.93}
PROXY_FACTOR = {"none": 0, "poe": 1, "ads": 2}  # proxy forwards per step

KEYS = {mode: f"sk-bench-{mode}" for mode in MODES}
# The arm of the proxy served alone (undefended), measured in the same rounds as the teacher's arms.
PROXY_ARM = "proxy-alone"

POLICY = """
[tiers.none]
defense = {{ mode = "none" }}

[tiers.poe]
defense = {{ mode = "poe", gamma = {gamma} }}

[tiers.ads]
defense = {{ mode = "ads", lam = {lam}, eps = {eps} }}

[[keys]]
key = "sk-bench-none"
tier = "none"

[[keys]]
key = "sk-bench-poe"
tier = "poe"

[[keys]]
key = "sk-bench-ads"
tier = "ads"
"""

# Fixed prompts: narrative openings a small model keeps continuing (raw completion, no chat template).
PROMPTS = [
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught "
    "him. That night the sea was restless, and far out beyond the reef he saw a light that should not have been there.",
    "Chapter 1. The village of Marrow Hill sat at the edge of a forest so old that nobody remembered who had planted "
    "it. Every spring the children were warned never to follow the path past the broken stone wall, and every spring",
    "In the summer of 1923 a young engineer named Clara arrived in the mountain town with a suitcase full of drawings "
    "and a plan to build a bridge across the gorge. The mayor laughed when he saw her designs, but",
    "The market opened before dawn. Fishermen hauled crates of silver mackerel onto the stone quay, bakers stacked "
    "warm loaves, and a girl with a basket of lemons wandered between the stalls looking for her brother, who",
    "Dear diary, today was the strangest day of my life. It started normally enough: I woke up late, missed the bus, "
    "and had to walk to school in the rain. But when I opened my locker, I found",
    "The spaceship had been drifting for three hundred years when the navigation computer finally woke the crew. "
    "Captain Ayodele was the first to open her eyes, and the first thing she noticed was that",
    "Grandmother kept a recipe book that nobody was allowed to read. It was bound in red leather, tied with string, "
    "and locked in the kitchen drawer. After she died, my cousins and I finally opened it and discovered",
    "The detective stood in the rain outside the museum, looking at the shattered window. Inside, the glass case that "
    "had held the emerald necklace for forty years was empty, and the only clue was",
]


@dataclass
class BenchConfig:
    """What one overhead run measures."""

    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    max_tokens: int = 64
    rounds: int = 3
    requests_per_slot: int = 2  # requests per round and mode = concurrency * this (at least min_requests)
    # At low concurrency a round of 2 requests lasts a few seconds, and one stall of
    # the machine moves its ratio by 0.1 or more; more requests per round average it out.
    min_requests: int = 2
    gamma: float = 0.65
    lam: float = 0.05
    eps: float = 1e-4
    seed: int = 0
    max_model_len: int = 512
    kv_cache_gib: float = 0.25
    dtype: str = "auto"
    teacher: str | None = None
    proxy: str | None = None
    limit: bool = True  # also serve the proxy alone for t_p
    # One server per runner, measured side by side (see the module docstring).
    proxy_runners: list[str] = field(default_factory=lambda: ["transformers", "vllm"])
    # The tiers measured on each defended server.
    modes: list[str] = field(default_factory=lambda: list(MODES))

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(concurrencies=[1, 8], max_tokens=12, rounds=1, requests_per_slot=1)


@dataclass
class RequestSample:
    ttft: float
    tpot: float | None
    tokens: int
    start: float = 0.0  # when it was sent (perf_counter; measure() makes it seconds since the run began)
    round: int = 0


@dataclass
class ModeStats:
    """Aggregates of one mode at one concurrency over all rounds."""

    requests: int
    tokens: int
    wall_s: float
    tok_per_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    # Tokens/s of each round on its own, in round order (paired across arms: same rounds).
    round_tok_per_s: list[float] = field(default_factory=list)
    # Every request: [round, sent at (s since the run began), TTFT s, TPOT s or None, tokens].
    # Where a stall fell (which round, which arm, which request) is read from these.
    requests_log: list[list[Any]] = field(default_factory=list)
    # Streams held back: their text after the first came in at under HELD_BACK_TPOT_S per token, i.e.
    # all at once, where the engine had spent a step on each token (a server that buffers its output).
    held_back: int = 0


# No engine here steps in under a millisecond; text that arrives faster was held back and released.
HELD_BACK_TPOT_S = 0.001
HELD_BACK_MIN_TOKENS = 8


def arm_name(mode: str, runner: str) -> str:
    """What a mode is called on a runner's server: ``poe`` (transformers), ``poe@vllm``."""
    return mode if runner == "transformers" else f"{mode}@{runner}"


def arm_mode(arm: str) -> str:
    return arm.split("@", 1)[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``distillgame serve`` subprocess on a free port (stopped with SIGTERM)."""

    def __init__(self, args: list[str], log_file: Path, app: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_file = log_file
        app = app or ["distillgame.cli", "serve"]
        cmd = [sys.executable, "-m", *app, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.command = cmd
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", VLLM_USE_V2_MODEL_RUNNER="0")
        self._log = open(log_file, "wb")
        logger.info("starting server: %s", shlex.join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def make_ads_grad(workdir: Path, proxy: str | None) -> Path:
    """A proxy gradient for the ADS tier from a few fixed prompt/completion pairs (cost, not quality, matters here)."""
    out = workdir / "ads_grad.safetensors"
    if out.exists():
        return out
    traces = workdir / "grad_traces.jsonl"
    with open(traces, "w") as fh:
        for i, p in enumerate(PROMPTS):
            fh.write(json.dumps({"prompt": f"Question {i}: what is {i + 3} times 7?\nAnswer:",
                                 "completion": f" {i + 3} times 7 is {(i + 3) * 7}. #### {(i + 3) * 7}"}) + "\n")
    cmd = [sys.executable, "-m", "distillgame.cli", "ads-grad", "--traces", str(traces), "--out", str(out)]
    if proxy:
        cmd += ["--proxy", proxy]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return out


# --------------------------------------------------------------------------- load generator


async def _one_request(client: Any, model: str, prompt: str, max_tokens: int, seed: int) -> RequestSample:
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=seed,
        stream=True, stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if first is None:
        first = end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return RequestSample(ttft=first - t0, tpot=tpot, tokens=tokens, start=t0)


async def run_batch(clients: dict[str, Any], models: dict[str, str], mode: str, concurrency: int, n_requests: int,
                    max_tokens: int, seed: int) -> tuple[float, list[RequestSample]]:
    """``n_requests`` requests of one arm, at most ``concurrency`` in flight; returns (wall seconds, samples)."""
    sem = asyncio.Semaphore(concurrency)

    async def go(i: int) -> RequestSample:
        async with sem:
            return await _one_request(clients[mode], models[mode], PROMPTS[i % len(PROMPTS)], max_tokens, seed + i)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*(go(i) for i in range(n_requests)))
    return time.perf_counter() - t0, list(samples)


def aggregate(walls: list[float], samples: list[RequestSample], round_tokens: list[int] | None = None) -> ModeStats:
    """One arm's stats over its rounds; ``round_tokens[r]`` is what round ``r`` (``walls[r]`` seconds) generated."""
    tokens = sum(s.tokens for s in samples)
    wall = sum(walls)
    ttfts = [s.ttft for s in samples]
    tpots = [s.tpot for s in samples if s.tpot is not None]
    return ModeStats(
        requests=len(samples), tokens=tokens, wall_s=wall, tok_per_s=tokens / wall if wall > 0 else float("nan"),
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50), tpot_p99=percentile(tpots, 99),
        round_tok_per_s=[t / w for t, w in zip(round_tokens or [], walls) if w > 0],
        requests_log=[[s.round, round(s.start, 3), round(s.ttft, 4), None if s.tpot is None else round(s.tpot, 5),
                       s.tokens] for s in samples],
        held_back=sum(s.tpot is not None and s.tpot < HELD_BACK_TPOT_S and s.tokens > HELD_BACK_MIN_TOKENS
                      for s in samples),
    )


def endpoints_of(url: str, modes: list[str], runner: str = "transformers") -> dict[str, tuple[str, str]]:
    """The arms of one server: arm name -> (base URL, API key of the mode's tier)."""
    if runner == PLAIN:
        return {arm_name("none", runner): (url, KEYS["none"])}
    return {arm_name(m, runner): (url, KEYS[m]) for m in modes}


async def measure(endpoints: dict[str, tuple[str, str]], cfg: BenchConfig,
                  label: str = "") -> dict[int, dict[str, ModeStats]]:
    """Per concurrency, per arm (``endpoints``: name -> (URL, key)): stats over ``cfg.rounds`` interleaved rounds."""
    from openai import AsyncOpenAI
    from tqdm import tqdm

    modes = list(endpoints)
    clients = {m: AsyncOpenAI(base_url=f"{url}/v1", api_key=key, timeout=600.0, max_retries=0)
               for m, (url, key) in endpoints.items()}
    models = {m: (await clients[m].models.list()).data[0].id for m in modes}
    # Warm-up: one short request per arm (first-step compilation, proxy caches).
    for m in modes:
        await run_batch(clients, models, m, 2, 2, 4, cfg.seed)
    out: dict[int, dict[str, ModeStats]] = {}
    origin = time.perf_counter()
    total = len(cfg.concurrencies) * cfg.rounds * len(modes)
    with tqdm(total=total, desc=f"overhead {label}".strip(), disable=None) as bar:
        for c in cfg.concurrencies:
            n_req = max(cfg.min_requests, c * cfg.requests_per_slot)
            walls: dict[str, list[float]] = {m: [] for m in modes}
            samples: dict[str, list[RequestSample]] = {m: [] for m in modes}
            round_tokens: dict[str, list[int]] = {m: [] for m in modes}
            for r in range(cfg.rounds):
                order = modes[r % len(modes):] + modes[: r % len(modes)]  # rotate so no mode always goes first
                for m in order:
                    wall, s = await run_batch(clients, models, m, c, n_req, cfg.max_tokens, cfg.seed + 1000 * r)
                    for x in s:
                        x.start, x.round = x.start - origin, r
                    walls[m].append(wall)
                    samples[m].extend(s)
                    round_tokens[m].append(sum(x.tokens for x in s))
                    bar.update(1)
            out[c] = {m: aggregate(walls[m], samples[m], round_tokens[m]) for m in modes}
    for cl in clients.values():
        await cl.close()
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        info["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_kib"] = int(fh.readline().split()[1])
    except OSError:
        pass
    for mod in ("torch", "vllm", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing version is not worth failing a report
            pass
    try:
        here = Path(__file__).parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=here).stdout.strip()
        # Uncommitted changes to tracked files: then the commit alone does not name the code that ran.
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                capture_output=True, text=True, cwd=here).stdout.strip())
    except OSError:
        pass
    return info


def build_report(teacher: dict[int, dict[str, ModeStats]], proxy: dict[int, dict[str, ModeStats]] | None,
                 cfg: BenchConfig, command: str, note: str = "") -> dict[str, Any]:
    rows = []
    for c, by_mode in teacher.items():
        # The teacher alone: vLLM's own server where it ran, else the transformers server's
        # undefended tier (a vllm-runner server may run the proxy on undefended rows too).
        base_arm = next((a for a in (arm_name("none", PLAIN), "none") if a in by_mode),
                        next(k for k in by_mode if arm_mode(k) == "none"))
        base = by_mode[base_arm]
        tp_over_tt = None
        if proxy is not None and c in proxy:
            # time per token ratio = inverse throughput ratio, same harness, same concurrency
            tp_over_tt = base.tok_per_s / proxy[c]["none"].tok_per_s
        for m, st in by_mode.items():
            ratio = base.tok_per_s / st.tok_per_s
            runner = m.split("@", 1)[1] if "@" in m else "transformers"
            row: dict[str, Any] = {
                "mode": m, "runner": runner, "concurrency": c, "ratio": ratio, "base": base_arm, **asdict(st),
                "tpot_ratio_p50": st.tpot_p50 / base.tpot_p50 if base.tpot_p50 else None,
                "tp_over_tt": tp_over_tt,
                # The same ratio within each round (the arms of a round ran back to back): its
                # spread is the run's own measure of how much one round can be trusted.
                "round_ratios": [b / x for b, x in zip(base.round_tok_per_s, st.round_tok_per_s)],
            }
            proxy_rounds = proxy[c]["none"].round_tok_per_s if proxy is not None and c in proxy else []
            if tp_over_tt is not None:
                row["limit"] = 1.0 + PROXY_FACTOR[arm_mode(m)] * tp_over_tt
                row["ratio_over_limit"] = ratio / row["limit"]
                k = PROXY_FACTOR[arm_mode(m)]
                if len(proxy_rounds) == len(row["round_ratios"]):
                    # The proxy ran in the same rounds: each round against its own floor.
                    row["round_ratio_over_limit"] = [
                        x / (1.0 + k * b / pr) for x, b, pr in zip(row["round_ratios"], base.round_tok_per_s,
                                                                   proxy_rounds)]
                else:
                    row["round_ratio_over_limit"] = [x / row["limit"] for x in row["round_ratios"]]
                row["normalized_overhead"] = (ratio - 1.0) / tp_over_tt if arm_mode(m) != "none" else None
            else:
                row["limit"] = None
            row["paper_normalized_overhead"] = PAPER_NORMALIZED.get(arm_mode(m))
            row["paper_ratio"] = PAPER_RATIO.get(arm_mode(m))
            rows.append(row)
    proxy_rows = [{"concurrency": c, **asdict(v["none"])} for c, v in (proxy or {}).items()]
    return {
        "benchmark": "overhead", "command": command, "config": asdict(cfg), "machine": machine_info(),
        "note": note, "output_length": "max_tokens with raw-completion narrative prompts, temperature 1, seeded "
        "(no ignore_eos, as in earlier runs); rates use the real generated token counts",
        "results": rows, "proxy_alone": proxy_rows,
    }


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report_header(title: str, report: dict[str, Any]) -> list[str]:
    """A results file's opening Markdown lines: title, command, machine and the run's note."""
    m = report["machine"]
    lines = [
        f"# {title}", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, vLLM {m.get('vllm', '?')}, "
        f"torch {m.get('torch', '?')}; load average at end {m.get('loadavg_at_end')}.", "",
    ]
    if report.get("note"):
        lines += [f"Note: {report['note']}", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = report_header("Defense overhead (HTTP server, async openai clients)", report)
    lines += [
        "| mode | conc | tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | ratio | limit | ratio/limit | "
        "ratio/limit by round | normalized (paper) | held back |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        paper = r.get("paper_normalized_overhead")
        by_round = r.get("round_ratio_over_limit") or []
        spread = f"{min(by_round):.2f}-{max(by_round):.2f}" if len(by_round) > 1 else "-"
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['tok_per_s']:.1f} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
            f"{1000 * r['tpot_p50']:.1f} / {1000 * r['tpot_p99']:.1f} | {r['ratio']:.2f} | {_fmt(r.get('limit'))} | "
            f"{_fmt(r.get('ratio_over_limit'))} | {spread} | {_fmt(r.get('normalized_overhead'))} ({_fmt(paper)}) | "
            f"{r.get('held_back', 0)} / {r['requests']} |"
        )
    if report["proxy_alone"]:
        lines += ["", "Proxy served alone (undefended), for t_p/t_t:", "",
                  "| conc | tok/s | TPOT p50 (ms) |", "|---|---|---|"]
        for p in report["proxy_alone"]:
            lines.append(f"| {p['concurrency']} | {p['tok_per_s']:.1f} | {1000 * p['tpot_p50']:.1f} |")
    bases = sorted({r.get("base", "none") for r in report["results"]})
    lines += ["", f"ratio = undefended tok/s (the teacher alone: `{'`, `'.join(bases)}`) / "
              "mode tok/s (same run, interleaved rounds); `none@plain`: vLLM's own server on the teacher, no "
              "defense in the engine; `MODE@vllm`: the server whose proxy runs on vLLM's layers (an early exit of "
              "the teacher on the teacher's own trunk), `MODE@vllm-separate`: the same proxy as a model of its own "
              "with its paged KV (on every scheduled token, so its `none` pays it too); limit = 1 + k t_p/t_t "
              "(k = 1 PoE, 2 ADS); by round: the lowest and highest ratio/limit of single rounds; "
              "normalized = (ratio - 1) / (t_p/t_t); held back: streams whose text after the first arrived at under "
              f"{1000 * HELD_BACK_TPOT_S:g} ms per token (all at once). Paper (7B teacher, 3B proxy): "
              "ratio 1.64 PoE / 2.93 ADS, normalized 1.49 / 4.5.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"none": "gray", "poe": "tab:blue", "ads": "tab:red"}
    arms = list(dict.fromkeys(r["mode"] for r in report["results"]))
    for m in arms:
        rows = [r for r in report["results"] if r["mode"] == m]
        cs = [r["concurrency"] for r in rows]
        style = "o-" if "@" not in m else "s:"
        ax.plot(cs, [r["ratio"] for r in rows], style, color=colors[arm_mode(m)], label=f"{m} measured")
        if m in PROXY_FACTOR and m != "none" and all(r.get("limit") is not None for r in rows):
            ax.plot(cs, [r["limit"] for r in rows], "--", color=colors[m], label=f"{m} limit 1+{PROXY_FACTOR[m]}t_p/t_t")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("time cost vs undefended")
    ax.set_title("Defense overhead vs its physical limit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def axes(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure and axes on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_pair_arguments(parser: Any, dtype: str = "bfloat16") -> None:
    """The options of a per-runner engine study: the pair, its dtype, the runners, where results go."""
    parser.add_argument("--teacher", default=None, help="teacher folder or id (default: the embedded one)")
    parser.add_argument("--proxy", default=None, help="proxy folder or id (default: the embedded one)")
    parser.add_argument("--dtype", default=dtype)
    parser.add_argument("--runners", default="vllm,transformers", help="proxy runners, one engine each")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def write_results(report: dict[str, Any], out_dir: Path, stem: str,
                  to_markdown: Callable[[dict[str, Any]], str],
                  to_png: Callable[[dict[str, Any], Path], None]) -> None:
    """``OUT/STEM.json``, ``.md`` and ``.png``: how every benchmark stores its results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(to_markdown(report))
    to_png(report, out_dir / f"{stem}.png")


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "overhead") -> None:
    write_results(report, out_dir, stem, markdown, plot)


# --------------------------------------------------------------------------- entry point


def server_args(cfg: BenchConfig, policy: Path, teacher: str | None, proxy: str | None, ads_grad: Path | None,
                runner: str = "transformers") -> list[str]:
    separate = runner == "vllm-separate"
    args = ["--policy", str(policy), "--proxy-runner", "vllm" if separate else runner,
            "--max-model-len", str(cfg.max_model_len),
            "--max-num-seqs", str(max(cfg.concurrencies)), "--memory-share", "0.1",
            "--kv-cache-gib", str(cfg.kv_cache_gib), "--dtype", cfg.dtype]
    if separate:
        args.append("--no-shared-trunk")
    if teacher:
        args += ["--teacher", teacher]
    if proxy:
        args += ["--proxy", proxy]
    if ads_grad is not None:
        args += ["--ads-grad", str(ads_grad)]
    return args


def plain_server_args(cfg: BenchConfig) -> list[str]:
    """vLLM's own server on the teacher with the defended servers' engine settings, and no defense."""
    from distillgame import models
    from distillgame.engine import EngineConfig

    engine = EngineConfig(teacher=models.resolve(cfg.teacher, "teacher"), proxy=models.resolve(cfg.proxy, "proxy"),
                          dtype=cfg.dtype, max_model_len=cfg.max_model_len, max_num_seqs=max(cfg.concurrencies),
                          memory_share=0.1, kv_cache_bytes=int(cfg.kv_cache_gib * (1 << 30)), proxy_runner="transformers",
                          disable_log_stats=False)
    argv = engine.server_args()
    for flag in ("--additional-config", "--hf-overrides"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i: i + 2]
    return argv


def run_overhead(cfg: BenchConfig, out_dir: Path, url: str | None = None, command: str = "", note: str = "",
                 workdir: Path | None = None) -> dict[str, Any]:
    from distillgame import models

    work = Path(workdir or tempfile.mkdtemp(prefix="distillgame-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.toml"
    policy.write_text(POLICY.format(gamma=cfg.gamma, lam=cfg.lam, eps=cfg.eps))
    if url is not None:
        teacher_stats = asyncio.run(measure(endpoints_of(url, list(MODES)), cfg, label="teacher"))
        proxy_stats = None
    else:
        grad = make_ads_grad(work, cfg.proxy)
        servers = {}
        try:
            # Every runner's server up at once, so their arms share the interleaved rounds.
            for runner in cfg.proxy_runners:
                log = work / f"serve-teacher-{runner}.log"
                if runner == PLAIN:
                    servers[runner] = Server(plain_server_args(cfg), log, app=["vllm.entrypoints.openai.api_server"])
                else:
                    servers[runner] = Server(server_args(cfg, policy, cfg.teacher, cfg.proxy, grad, runner), log)
            if cfg.limit:
                # The floor's proxy alone is one more arm of the same rounds, so load that comes
                # and goes reaches the floor as it reaches the modes.
                proxy_dir = str(models.resolve(cfg.proxy, "proxy"))
                servers[PROXY_ARM] = Server(server_args(cfg, policy, proxy_dir, proxy_dir, grad),
                                            work / "serve-proxy.log")
            endpoints: dict[str, tuple[str, str]] = {}
            for name, server in servers.items():
                server.wait_ready()
                if name == PROXY_ARM:
                    endpoints[PROXY_ARM] = (server.url, KEYS["none"])
                else:
                    endpoints.update(endpoints_of(server.url, list(cfg.modes), name))
            teacher_stats = asyncio.run(measure(endpoints, cfg, label="teacher"))
        finally:
            for server in servers.values():
                server.stop()
        proxy_stats = ({c: {"none": by_arm.pop(PROXY_ARM)} for c, by_arm in teacher_stats.items()}
                       if cfg.limit else None)
    report = build_report(teacher_stats, proxy_stats, cfg, command, note)
    write_report(report, out_dir)
    return report
