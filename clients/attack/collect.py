"""Collect teacher traces from any OpenAI-compatible endpoint.

For: sending a task split's prompts to an endpoint (ours, vLLM's, a hosted
API) through the official ``openai`` SDK, with bounded concurrency, retries
with exponential backoff on 429 / 5xx / connection errors, and resume: the
output is an append-only JSONL keyed by problem id, so a rerun after a crash
or a kill continues where it stopped and never writes an id twice. Each record
carries the endpoint, model, sampling parameters and timing; a
``<out>.summary.json`` beside it has the run's totals (wall time, tokens,
accuracy against the ground truth).

Not for: choosing the defense. The provider decides it (our server: by API
key); an attacker only sees what comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class CollectConfig:
    base_url: str
    model: str
    task: str
    split: str
    out: Path
    n: int | None = None
    api_key: str = "EMPTY"
    api: str = "completions"  # "completions" (plain prompt) | "chat"
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed sent with each request (seed + index)
    stop: list[str] | None = None  # None -> the task's stop strings (completions API)
    concurrency: int = 8
    max_retries: int = 6
    backoff_s: float = 0.5  # first retry delay; doubles per attempt, with jitter
    max_backoff_s: float = 30.0
    timeout_s: float = 600.0
    data_dir: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, got {self.api!r}")
        self.out = Path(self.out)

    def sampling(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }


def read_records(path: Path) -> dict[str, dict]:
    """Records of a trace file by id; a torn last line (a killed writer) is ignored."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.setdefault(str(rec["id"]), rec)
    return records


def repair_tail(path: Path) -> None:
    """Cut a partial last line left by a kill mid-write, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        log.warning("%s: dropped a partial last record", path)


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def _query(client: Any, cfg: CollectConfig, problem: Any, index: int) -> dict:
    """One problem through the endpoint, retried with backoff; returns its record."""
    from distillgame import tasks

    stop = cfg.stop if cfg.stop is not None else (list(tasks.STOP_STRINGS) if cfg.api == "completions" else None)
    common: dict[str, Any] = dict(
        model=cfg.model,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=stop,
        extra_body=cfg.extra_body or None,
    )
    if cfg.seed is not None:
        common["seed"] = cfg.seed + index
    record: dict[str, Any] = {"id": problem.id, "task": cfg.task, "split": cfg.split}
    if cfg.api == "completions":
        record["prompt"] = tasks.build_prompt(problem, cfg.task)
    else:
        record["messages"] = tasks.build_chat_messages(problem, cfg.task)

    for attempt in range(cfg.max_retries + 1):
        t0 = time.perf_counter()
        try:
            if cfg.api == "completions":
                resp = await client.completions.create(prompt=record["prompt"], **common)
                choice = resp.choices[0]
                text = choice.text
            else:
                resp = await client.chat.completions.create(messages=record["messages"], **common)
                choice = resp.choices[0]
                text = choice.message.content or ""
            break
        except Exception as exc:  # the SDK's error classes; anything else propagates below
            if not _retryable(exc) or attempt == cfg.max_retries:
                raise
            delay = _retry_after(exc) or min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt)
            delay *= 1.0 + 0.25 * random.random()  # jitter: concurrent retries do not line up
            log.debug("%s: %s, retry %d in %.2fs", problem.id, type(exc).__name__, attempt + 1, delay)
            await asyncio.sleep(delay)
    usage = getattr(resp, "usage", None)
    record.update(
        completion=text,
        finish_reason=choice.finish_reason,
        answer=problem.answer,
        correct=tasks.is_correct(text, problem.answer),
        endpoint=cfg.base_url,
        model=cfg.model,
        sampling={**cfg.sampling(), "stop": stop, "seed": common.get("seed")},
        extra_body=cfg.extra_body or None,
        usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} if usage else None,
        latency_s=round(time.perf_counter() - t0, 4),
        attempts=attempt + 1,
        finished_at=time.time(),
    )
    return record


async def collect_async(cfg: CollectConfig) -> dict:
    import openai

    from distillgame import tasks

    problems = tasks.load_problems(cfg.task, cfg.split, n=cfg.n, data_dir=cfg.data_dir)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(cfg.out)
    done = read_records(cfg.out)
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    log.info("collect %s/%s from %s: %d problems, %d already done", cfg.task, cfg.split, cfg.base_url, len(problems), len(problems) - len(todo))

    # Retries are ours (logged, counted per record), not the SDK's hidden ones.
    client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s)
    sem = asyncio.Semaphore(cfg.concurrency)
    failures: list[str] = []

    async def one(i: int, p: Any) -> dict | None:
        async with sem:
            try:
                return await _query(client, cfg, p, i)
            except openai.APIError as exc:
                failures.append(p.id)
                log.error("%s failed: %s", p.id, exc)
                return None

    t0 = time.perf_counter()
    # O_APPEND + one write per line: a record is on disk whole or (if killed
    # mid-write) as a torn tail that the next run cuts off.
    fd = os.open(cfg.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(total=len(problems), initial=len(problems) - len(todo), desc="collect", unit="problem") as bar:
            for fut in asyncio.as_completed([one(i, p) for i, p in todo]):
                rec = await fut
                if rec is not None:
                    os.write(fd, (json.dumps(rec) + "\n").encode())
                bar.update(1)
    finally:
        os.close(fd)
        await client.close()
    wall = time.perf_counter() - t0

    records = read_records(cfg.out)
    ours = [records[p.id] for p in problems if p.id in records]
    tokens = sum((r.get("usage") or {}).get("completion_tokens", 0) for r in ours)
    summary = {
        "endpoint": cfg.base_url,
        "model": cfg.model,
        "task": cfg.task,
        "split": cfg.split,
        "api": cfg.api,
        "sampling": cfg.sampling(),
        "n_problems": len(problems),
        "n_records": len(ours),
        "failures": failures,
        "accuracy": sum(bool(r.get("correct")) for r in ours) / len(ours) if ours else None,
        "completion_tokens": tokens,
        "wall_s_this_run": wall,
        "generated_this_run": len(todo) - len(failures),
        "latency_s_sum": sum(r.get("latency_s", 0.0) for r in ours),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "api_key"},
    }
    summary_path = cfg.out.with_suffix(cfg.out.suffix + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def collect(cfg: CollectConfig) -> dict:
    """Synchronous entry point (the CLI and ``table`` use it)."""
    return asyncio.run(collect_async(cfg))
