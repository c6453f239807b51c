"""Hostile input and security against ``distillgame serve`` (vLLM's OpenAI server with the policy middleware).

One server for the whole module (a real socket, the real engine on the
embedded models, the test policy), fed what an adversarial caller sends:
prompts over the context, absurd ``max_tokens``/``n``, huge stop lists,
invalid UTF-8 and control characters, wrong JSON types, bodies that are not
strict JSON, a 10 MB body, a slow-loris body, and schemathesis-generated
requests (from vLLM's own OpenAPI schema, on the routes and fields the
middleware lets through). Every answer must be a 2xx or a 4xx in OpenAI's
error shape (never a 5xx), and the server must keep serving. Security: 429
with Retry-After, no CORS, no key or prompt text in the logs. Where vLLM's
app answers without naming the field (an out-of-vocabulary id: ``param``
null), the field is checked where it is named.

Not for: load, faults under concurrency or SIGTERM (``test_hardening_load.py``).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest_server import (
    LIMITED_KEY,
    ServerProcess,
    assert_openai_error,
    metric_sum,
    run_schemathesis,
    serving,
    vllm_allowed_operations,
)

KEY = "sk-test-standard"
CAPPED = "sk-test-capped"  # tier capped at 3 tokens: generated requests stay cheap
MARKER = "zebra-quokka-7781 secret prompt text"
BODY_TIMEOUT_S = 3.0
SCHEMATHESIS_CASES = 1000
GENERATED_2XX_SHARE = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("harden"))
    with serving(srv, ["--body-timeout", str(BODY_TIMEOUT_S), "--max-body-mb", "4"], timeout=400):
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _still_serving(server: ServerProcess) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {CAPPED}"},
                   json={"prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] is not None
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"prompt": list(range(2000)), "max_tokens": 1}, "prompt"),             # token ids over the 1024 context
    ({"prompt": "word " * 3000, "max_tokens": 1}, "prompt"),                # text over the context
    ({"prompt": "hi", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2**70}, "max_tokens"),                  # beyond int64
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 10**9}, "n"),
    ({"prompt": "hi", "n": -1}, "n"),
    ({"prompt": "hi", "stop": ["x"] * 100_000}, "stop"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": 1e308}, "temperature"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [[1, 2], "x", 3]}, "prompt"),
    ({"prompt": [-1, 5]}, "prompt"),                                       # token id out of the vocabulary
    ({"prompt": [10**12]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "stream": "yes please"}, "stream"),
    ({"prompt": "hi", "logprobs": 10**6}, "logprobs"),
    ({"prompt": "hi", "seed": "abc"}, "seed"),
    ({"prompt": "hi", "seed": 2**63}, "seed"),                              # a torch.Generator seed is int64
    ({"prompt": "hi", "seed": 1270587534405195792384, "echo": True}, "seed"),
    ({"prompt": "hi", "seed": -20557350380078397614021882675200}, "seed"),
    ({"prompt": "hi", "vllm_xargs": {"distillgame": {"mode": "none"}}}, "vllm_xargs"),
])
def test_hostile_completion_bodies_are_4xx_in_openai_shape(server, http, body, param):
    r = http.post("/v1/completions", json=body)
    err = assert_openai_error(r, 400)
    if err["param"]:
        # vLLM's own errors do not always say which field (an out-of-vocabulary id: param null).
        assert param in err["param"] or param in err["message"], err


# vLLM's app serves this (its chat template renders any role). No defense is at
# stake: the answer is the tier's.
SERVED_BY_VLLM = [{"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}]


@pytest.mark.parametrize("body", [
    {"messages": "hello"},
    {"messages": []},
    *SERVED_BY_VLLM,
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 1000, "logprobs": True},
    {"messages": [{"role": "user", "content": "word " * 3000}]},
    {"messages": [{"role": "user", "content": "hi"}], "stop": [str(i) for i in range(17)]},
    {"messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 0},  # vLLM: greedy needs n = 1
    {"messages": [{"role": "user", "content": "hi"}], "seed": -20557350380078397614021882675200},
])
def test_hostile_chat_bodies_are_4xx_in_openai_shape(server, http, body):
    r = http.post("/v1/chat/completions", json=body)
    if body in SERVED_BY_VLLM:
        assert r.status_code == 200, r.text
        return
    assert_openai_error(r, 400)


@pytest.mark.parametrize("raw,ctype", [
    (b'{"prompt": "\xff\xfe\xfd", "max_tokens": 1}', "application/json"),   # invalid UTF-8
    (b'{"prompt": "a\x00b\x01c", "max_tokens": 1}', "application/json"),    # raw control chars: invalid JSON
    (b'{"prompt": "hi", "max_tokens": 1', "application/json"),              # truncated JSON
    (b'[1, 2, 3]', "application/json"),                                     # wrong top-level type
    (b'null', "application/json"),
    (b'prompt=hi&max_tokens=1', "application/x-www-form-urlencoded"),
    (b'\x00' * 1000, "application/octet-stream"),
    (b'', "application/json"),
    (b'{"prompt": "hi", "max_tokens": 1, "temperature": NaN}', "application/json"),     # not JSON, but Python's
    (b'{"prompt": "hi", "max_tokens": 1, "top_p": -Infinity}', "application/json"),
    (b'{"prompt": "hi", "max_tokens": 1, "temperature": 1e999}', "application/json"),    # parses as inf
    (b'{"prompt": ' + b'[' * 100_000 + b']' * 100_000 + b'}', "application/json"),       # deeper than the parser goes
])
def test_malformed_bytes_are_400(http, raw, ctype):
    r = http.post("/v1/completions", content=raw, headers={"Content-Type": ctype})
    assert_openai_error(r, 400)


def test_escaped_control_characters_and_odd_unicode_are_served(server, http):
    # Valid JSON whose strings hold NUL, escapes, lone surrogates' replacements and RTL marks: generate normally.
    prompt = "a\u0000b\u0001c\u001b[31m\u202e\ufffd\U0001F600 end"
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                           "stop": ["\u0000", "\u202e", "x" * 5000]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 5
    # JSON can carry a lone surrogate escape, which is no Unicode text: 400, wherever it appears.
    for raw in (b'{"prompt": "lone \\ud800 surrogate", "max_tokens": 1}',
                b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}',
                b'{"prompt": "hi", "max_tokens": 1, "stop": ["\\ud800"]}',
                b'{"prompt": "hi", "max_tokens": 1, "model": "\\ud800"}'):
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_openai_error(r)
    raw = b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}'
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)
    _still_serving(server)


def test_unknown_paths_and_methods_are_4xx_in_openai_shape(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
    assert_openai_error(http.delete("/v1/models"), 405)


def test_ten_megabyte_body_is_refused_early_with_413(server, http):
    body = json.dumps({"prompt": "x" * (10 << 20), "max_tokens": 1}).encode()
    t0 = time.monotonic()
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    err = assert_openai_error(r, 413)
    assert err["code"] == "request_too_large"
    assert time.monotonic() - t0 < 10
    # Chunked (no Content-Length): counted as it arrives and cut off at the limit.
    def chunks():
        for _ in range(10):
            yield b"x" * (1 << 20)
    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert assert_openai_error(r, 413)["code"] == "request_too_large"
    _still_serving(server)


def test_slow_loris_body_times_out_and_others_are_served(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    socks = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + CAPPED.encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        socks.append(s)
    t0 = time.monotonic()
    _still_serving(server)  # the trickling connections block nobody
    for s in socks:
        try:
            for i in range(3, 10):  # one byte a second: the whole body would take longer than the deadline
                s.sendall(body[i:i + 1])
                time.sleep(1.0)
        except OSError:
            pass
    answers = []
    for s in socks:
        data = b""
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except OSError:
            pass
        s.close()
        answers.append(data)
    elapsed = time.monotonic() - t0
    for data in answers:
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data[:300]
        assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert elapsed < BODY_TIMEOUT_S + 15
    _still_serving(server)


def test_rate_limit_429_carries_retry_after(server):
    limited = httpx.Client(base_url=server.base_url, timeout=120, headers={"Authorization": f"Bearer {LIMITED_KEY}"})
    statuses = []
    for _ in range(3):
        r = limited.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        statuses.append(r.status_code)
    assert statuses[:2] == [200, 200] and statuses[2] == 429, statuses
    err = assert_openai_error(r, 429)
    assert err["type"] == "rate_limit_error"
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 60, retry
    # The SDK maps it to its own class.
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=LIMITED_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        sdk.completions.create(model="", prompt="hi", max_tokens=1)
    # Other keys are not limited by it.
    _still_serving(server)


def test_cors_is_off_by_default(http):
    r = http.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)
    r = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


def test_no_key_or_prompt_text_in_the_logs(server, http):
    r = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": MARKER, "max_tokens": 2}, timeout=120)
    assert r.status_code == 200
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": MARKER}], "max_tokens": 2}, timeout=120)
    assert r.status_code == 200
    bad_key = "sk-wrong-" + MARKER.split()[0]
    assert httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {bad_key}"},
                      json={"prompt": MARKER}, timeout=60).status_code == 401
    time.sleep(1.0)
    log = server.log_file.read_text(errors="replace")
    assert len(log) > 100  # the server does log (start-up, engine), just not these
    for secret in (MARKER, MARKER.split()[0], KEY, CAPPED, LIMITED_KEY, bad_key):
        assert secret not in log, f"{secret!r} appears in the server log"


# ---------------------------------------------------------------- schemathesis

def test_schemathesis_generated_requests(server):
    """>= 1000 generated requests across the served operations: no 5xx, 4xx in OpenAI's shape, many reach the engine."""
    from distillgame import models

    # vLLM's own schema of the allowed routes; its /openapi.json is not one of them.
    operations = vllm_allowed_operations(models.resolve(None, "teacher"), models.TEACHER_NAME)
    expected = {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                "POST /tokenize", "POST /detokenize"}
    assert expected <= {op.label for op in operations}
    run = run_schemathesis(operations, server.base_url, {"Authorization": f"Bearer {CAPPED}"},
                           post_cases=SCHEMATHESIS_CASES, other_cases=25)
    summary = run.summary(front_end=server.kind)
    Path(server.workdir / "schemathesis.json").write_text(summary)
    print(f"\nschemathesis on {server.kind}: {summary}")
    assert not run.failures, "\n".join(run.failures[:20])
    assert run.total >= SCHEMATHESIS_CASES, summary
    # Generation actually reached the engine for a good share of the cases on each route.
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        tally = run.counts[label]
        assert tally.get("2xx", 0) >= GENERATED_2XX_SHARE * sum(tally.values()), summary
    _still_serving(server)


def test_no_5xx_was_ever_answered_and_the_engine_never_restarted(server):
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    # The middleware counts every generation request in this family.
    assert metric_sum(text, "distillgame_requests_total", status="error") == 0
    # vLLM's server exits when its engine fails, and the supervisor logs each restart.
    assert server.restarts() == 0
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    log = server.log_tail(400)
    assert "Traceback" not in log, log
