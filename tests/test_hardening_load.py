"""Load, faults under concurrency and SIGTERM under load, on one real server.

Order matters (one server for the module, as in CI): a streaming load with
random mid-stream disconnects (memory and engine queues checked after), then
a proxy failure in the middle of a batch of defended streams (every token
released before it is recomputed under the policy by the float64 reference),
then SIGTERM while clients stream. The CI share is 64 clients for 20 s; the
60 s run is ``python -m distillgame.bench.load --start --full``.

Not for: single-request behaviour (``test_server.py``) or hostile input
(``test_hardening.py``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from distillgame.bench.load import LoadConfig, measure, run_load, wait_drained
from tests.conftest_server import ServerProcess, metric_sum

KEY = "sk-test-standard"  # PoE gamma 0.65, logprobs allowed
GAMMA = 0.65
CI_CLIENTS = 64
CI_DURATION_S = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("load"))
    srv.start(["--max-num-seqs", "32"])
    try:
        srv.wait_ready(timeout=400)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference():
    from distillgame import models
    from distillgame.plugins.reference import ReferenceModels

    torch.set_num_threads(1)
    return ReferenceModels(models.resolve(None, "teacher"), models.resolve(None, "proxy"))


def test_streaming_load_with_disconnects(server, tmp_path_factory):
    cfg = LoadConfig(url=server.base_url, key=KEY, clients=CI_CLIENTS, duration_s=CI_DURATION_S,
                     disconnect_frac=0.2, min_tokens=4, max_tokens=24)
    result = measure(cfg, server.proc.pid, warmup_s=6.0)
    result.pop("_ttft", None)
    print("\nload:", json.dumps(result, sort_keys=True))
    (server.workdir / "load.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    assert not result["malformed"], result["malformed_examples"]
    assert not any(code.startswith("5") for code in result["status_codes"]), result["status_codes"]
    assert set(result["outcomes"]) <= {"ok", "disconnected"}, result["outcomes"]
    assert result["served"] >= 20 and result["disconnects"] >= 3, result["outcomes"]
    # The engine holds nothing afterwards (checked by measure() through /metrics; repeated here for the record).
    assert all(v == 0 for v in result["gauges_after"].values()), result["gauges_after"]
    assert abs(result["rss_change"]) <= 0.10, result
    # Every disconnect was aborted in the engine (it holds no request afterwards, above; vLLM counts no
    # aborts in its request_success family), and nothing failed.
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric_sum(text, "distillgame_requests_total", status="error") == 0


def _stream_tokens(server: ServerProcess, prompt: str, seed: int, record: dict) -> None:
    """One defended stream with token ids and their logprobs; records what was released and how it ended."""
    body = {"prompt": prompt, "max_tokens": 300, "temperature": 1.0, "seed": seed, "stream": True,
            "logprobs": 1, "return_tokens_as_token_ids": True}
    record.update(tokens=[], logprobs=[], end=None)
    try:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            record["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    record["done"] = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record["end"] = "error_event"
                    record["error"] = event["error"]
                    continue
                for choice in event["choices"]:
                    lp = choice.get("logprobs")
                    if lp:
                        record["tokens"] += [int(t.split(":", 1)[1]) for t in lp["tokens"]]
                        record["logprobs"] += lp["token_logprobs"]
                    if choice.get("finish_reason"):
                        record["end"] = choice["finish_reason"]
    except httpx.HTTPError as exc:
        record["end"] = f"transport:{type(exc).__name__}"
        record["done"] = False


def test_proxy_failure_mid_batch_releases_no_undefended_token(server, reference):
    from transformers import AutoTokenizer

    from distillgame import models

    tok = AutoTokenizer.from_pretrained(models.resolve(None, "teacher"))
    prompts = ["Once upon a time", "The sea is", "List some fruits:", "Dear diary,", "In 1850,",
               "The recipe needs", "Q: Why is the sky blue? A:", "Chapter one."]
    records = [dict() for _ in prompts]
    threads = [threading.Thread(target=_stream_tokens, args=(server, p, 100 + i, records[i]))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    # Fault once every stream has released a few tokens: the failure lands mid-batch.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(len(r.get("tokens", [])) >= 3 for r in records):
        time.sleep(0.05)
    server.fault_file.touch()
    for t in threads:
        t.join(timeout=120)
    try:
        ends = [r["end"] for r in records]
        assert all(r["status"] == 200 for r in records), records
        # Streams still running at the fault end with an error event, or their connection is cut when the
        # server exits (fail closed): none finishes after the fault.
        failed = [e for e in ends if e == "error_event" or str(e).startswith("transport:")]
        assert set(ends) - set(failed) <= {"stop", "length"}, ends
        assert len(failed) >= len(prompts) // 2, ends
        # While the engine is down, new requests get an error or no connection, never an answer.
        server.wait_health(want_ok=False, timeout=30)
        try:
            r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert r.status_code >= 500, r.text
        except httpx.HTTPError:
            pass
    finally:
        server.fault_file.unlink(missing_ok=True)

    # Every released token of three streams, recomputed: its logprob is the defended one, not the teacher's.
    defense = {"mode": "poe", "gamma": GAMMA}
    checked, worst, far_from_teacher = 0, 0.0, 0
    for i, rec in enumerate(records[:3]):
        prompt_ids = tok(prompts[i])["input_ids"]
        assert rec["tokens"], rec
        for pos, (tid, lp) in enumerate(zip(rec["tokens"], rec["logprobs"])):
            prefix = prompt_ids + rec["tokens"][:pos]
            defended = reference.next_token_logprobs(prefix, defense)[tid].item()
            teacher = reference.next_token_logprobs(prefix, {"mode": "none"})[tid].item()
            worst = max(worst, abs(lp - defended))
            far_from_teacher += abs(lp - teacher) > 1e-2
            checked += 1
    print(f"\nfault: ends={ends} tokens checked={checked} worst |lp - defended|={worst:.2e} "
          f"far from teacher={far_from_teacher}")
    assert worst < 1e-3, worst
    assert far_from_teacher >= checked // 2, (far_from_teacher, checked)
    server.wait_health(want_ok=True, timeout=400)


def test_sigterm_during_load_finishes_or_refuses_cleanly(server):
    wait_drained(server.base_url, timeout=60)
    cfg = LoadConfig(url=server.base_url, key=KEY, clients=16, duration_s=8.0, disconnect_frac=0.0,
                     min_tokens=8, max_tokens=16, seed=7)
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(report=asyncio.run(run_load(cfg))))
    t.start()
    time.sleep(3.0)
    code = server.stop(timeout=180)
    t.join(timeout=180)
    report = box["report"]
    print("\nsigterm:", json.dumps(report.summary(), sort_keys=True))
    assert code == 0, server.log_tail()
    assert not report.malformed, report.malformed[:5]
    # Draining: new requests get 503 (code "draining", Retry-After) or no connection; nothing else fails.
    assert not any(code.startswith("5") and code != "503" for code in report.status_codes), report.status_codes
    # In-flight requests finished; later ones were refused before reaching the app, never cut short.
    assert report.outcomes.get("ok", 0) >= 16, report.outcomes
    assert all(k in ("ok", "5xx") or k.startswith("transport:") for k in report.outcomes), report.outcomes
