"""``attack collect`` against a real HTTP endpoint: retries, and resume after SIGKILL.

The endpoint here is a minimal OpenAI-compatible FastAPI app defined in this
file (deterministic completions, injected 429/503s) on a real socket: the
harness must work against any endpoint, and this keeps the kill/resume test
fast without a vLLM engine. The table smoke test drives our own server.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

N_PROBLEMS = 40


def make_app(counts: Counter) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "toy-teacher", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        import asyncio

        body = await request.json()
        prompt = body["prompt"]
        key = hashlib.sha256(prompt.encode()).hexdigest()
        counts[key] += 1
        # Every third prompt is rate-limited on its first try, every fifth fails once with 503.
        n = int(key, 16)
        if counts[key] == 1 and n % 3 == 0:
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}},
                                status_code=429, headers={"retry-after": "0.05"})
        if counts[key] == 1 and n % 5 == 0:
            return JSONResponse({"error": {"message": "busy", "type": "server_error", "param": None, "code": None}},
                                status_code=503)
        await asyncio.sleep(0.1)  # slow enough that a kill lands mid-run
        answer = prompt.split("Question: what is ")[1].split("?")[0]
        text = f"It is {answer}.\n#### {answer}"
        return {
            "id": f"cmpl-{key[:8]}", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(prompt.split()) + len(text.split())},
        }

    return app


@pytest.fixture(scope="module")
def endpoint():
    import uvicorn

    counts: Counter = Counter()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(counts), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "test endpoint did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", counts
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def problems_file(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    with open(path, "w") as f:
        for i in range(N_PROBLEMS):
            f.write(json.dumps({"id": f"p{i:03d}", "question": f"what is {i * 7}?", "answer": str(i * 7)}) + "\n")
    return path


def collect_cmd(base_url: str, problems: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "distillgame.cli", "attack", "collect", "--base-url", base_url,
            "--task", f"jsonl:{problems}", "--split", "test", "--out", str(out), "--concurrency", "4",
            "--temperature", "0.7", "--max-tokens", "32"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_collect_resumes_after_sigkill_without_duplicates(endpoint, problems_file, tmp_path):
    base_url, counts = endpoint
    out = tmp_path / "traces.jsonl"
    err = open(tmp_path / "collect.err", "w")
    proc = subprocess.Popen(collect_cmd(base_url, problems_file, out), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while len(lines(out)) < 8:
        assert proc.poll() is None, (tmp_path / "collect.err").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = lines(out)
    assert 8 <= len(first) < N_PROBLEMS
    # A kill can also land inside a write; simulate that torn tail.
    with open(out, "a") as f:
        f.write('{"id": "p0')

    rerun = subprocess.run(collect_cmd(base_url, problems_file, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    records = [json.loads(line) for line in lines(out)]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_PROBLEMS
    assert set(ids) == {f"p{i:03d}" for i in range(N_PROBLEMS)}
    assert [json.loads(line)["id"] for line in first] == ids[: len(first)]  # append-only: old lines untouched
    for r in records:
        assert r["correct"] is True and r["completion"].endswith(f"#### {r['answer']}")
        assert r["endpoint"] == base_url and r["model"] == "toy-teacher"
        assert r["sampling"]["temperature"] == 0.7 and r["sampling"]["max_tokens"] == 32
        assert r["latency_s"] > 0 and r["usage"]["completion_tokens"] > 0
    # Injected 429/503 were retried: those records needed a second attempt.
    assert any(r["attempts"] > 1 for r in records)
    summary = json.loads(out.with_suffix(".jsonl.summary.json").read_text())
    assert summary["n_records"] == N_PROBLEMS and summary["accuracy"] == 1.0 and summary["failures"] == []
    assert summary["generated_this_run"] == N_PROBLEMS - len(first)

    # A third run has nothing left to do and sends nothing.
    before = sum(counts.values())
    again = subprocess.run(collect_cmd(base_url, problems_file, out), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(lines(out)) == N_PROBLEMS
    assert sum(counts.values()) == before


def test_attack_eval_scores_the_teacher_through_its_endpoint(endpoint, problems_file, tmp_path):
    base_url, _ = endpoint
    cmd = [sys.executable, "-m", "distillgame.cli", "attack", "eval", "--base-url", base_url,
           "--task", f"jsonl:{problems_file}", "--split", "test", "--n", "10", "--out", str(tmp_path / "teacher")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "teacher" / "teacher.jsonl.summary.json").read_text())
    assert summary["n_records"] == 10 and summary["accuracy"] == 1.0
    assert summary["model"] == "toy-teacher"  # discovered from /v1/models
    assert summary["sampling"]["temperature"] == 0.0  # teacher accuracy is greedy
