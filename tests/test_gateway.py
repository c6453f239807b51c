"""The policy as middleware on vLLM's own OpenAI server (``--middleware distillgame.server.gateway.DefensePolicy``).

Two layers. First, the middleware in front of a stand-in app that records the
body it receives (fast, no engine): what is refused, what the body becomes,
and the engine check's 503s. Then one real ``python -m
vllm.entrypoints.openai.api_server`` process on the tiny pair with the
middleware (``VllmServeProcess``), driven with the ``openai`` SDK: a PoE
tier's logprobs are the float64 reference's, no caller field changes the
defense, prompt logprobs are refused, unknown keys are 401, and every route of
vLLM's app that is not on the allowlist answers 404 in OpenAI's shape.

Not for: the security suites both front ends run (``test_hardening.py`` and the
leak tests of ``test_server.py``, parametrized over ``distillgame serve`` and
``vllm serve``, the latter marked slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest_server import VllmServeProcess, serving, vllm_app
from distillgame.server.gateway import BODY_TIMEOUT_ENV, MAX_BODY_MB_ENV, ROUTES, DefensePolicy
from distillgame.server.metrics import ServerMetrics
from distillgame.server.policy import Policy, load_policy

GAMMA = 0.65
POLICY = """
[tiers.standard]
defense = { mode = "poe", gamma = 0.65 }
max_top_logprobs = 5

[tiers.open]
defense = { mode = "none" }

[tiers.capped]
defense = { mode = "poe", gamma = 0.65 }
max_tokens = 3
allow_logprobs = false

[tiers.limited]
defense = { mode = "ads", lam = 0.1, eps = 0.05 }
requests_per_minute = 1

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
key = "sk-test-limited"
tier = "limited"
"""
STANDARD = {"Authorization": "Bearer sk-test-standard"}
ERROR_KEYS = {"message", "type", "param", "code"}


def _policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


class _Engine:
    """Stands in for vLLM's EngineClient: its config and the workers' status answers."""

    def __init__(self, logprobs_mode: str = "processed_logprobs", statuses: list[dict] | None = None,
                 ads_grad: str | None = "grad.safetensors") -> None:
        model_config = type("M", (), {"logprobs_mode": logprobs_mode})()
        section = {"proxy": "proxy", **({"ads_grad": ads_grad} if ads_grad else {})}
        self.vllm_config = type("C", (), {"model_config": model_config, "additional_config": {"distillgame": section}})()
        self.statuses = statuses if statuses is not None else [
            {"configured": True, "live": 1, "speculative": False, "async_scheduling": False}]
        self.calls = 0

    async def collective_rpc(self, method: str) -> list[dict]:
        self.calls += 1
        if method == "distillgame_fidelity":
            return [{"poe": {"tokens": 0, "kl_sum": 0.0, "argmax_agree": 0}}]
        return self.statuses


def _stand_in(tmp_path: Path, engine: _Engine | None = None, **options: Any) -> tuple[TestClient, list[dict]]:
    """The middleware in front of an app that echoes what reached it."""
    seen: list[dict] = []

    async def record(request: Request) -> JSONResponse:
        body = await request.body()
        seen.append(json.loads(body) if body else {})
        return JSONResponse({"path": request.url.path})

    app = Starlette(routes=[Route(path, record, methods=["GET", "POST"])
                            for path in (*ROUTES, "/v1/responses", "/collective_rpc")])
    app.state.engine_client = engine or _Engine()
    app.add_middleware(DefensePolicy, policy=_policy(tmp_path), metrics=ServerMetrics(), **options)
    return TestClient(app), seen


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def test_the_tiers_defense_is_written_as_flat_vllm_xargs(tmp_path):
    client, seen = _stand_in(tmp_path)
    r = client.post("/v1/completions", headers=STANDARD, json={"prompt": "hi", "max_tokens": 2, "logprobs": 5})
    assert r.status_code == 200, r.text
    assert seen[-1] == {"prompt": "hi", "max_tokens": 2, "logprobs": 5,
                        "vllm_xargs": {"distillgame_mode": "poe", "distillgame_gamma": GAMMA}}
    client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-test-open"},
                json={"messages": [{"role": "user", "content": "hi"}]})
    assert seen[-1]["vllm_xargs"] == {"distillgame_mode": "none"}
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-test-limited"},
                    json={"messages": [{"role": "user", "content": "hi"}]})
    assert seen[-1]["vllm_xargs"] == {"distillgame_mode": "ads", "distillgame_lam": 0.1, "distillgame_eps": 0.05}


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "vllm_xargs", {"distillgame_mode": "none"}),
    ("/v1/completions", "extra_args", {"distillgame": {"mode": "none"}}),
    ("/v1/completions", "distillgame", {"mode": "none"}),
    ("/v1/completions", "logits_processors", ["x:Y"]),
    ("/v1/completions", "logit_bias", {"5": 100}),
    ("/v1/completions", "allowed_token_ids", [5]),
    ("/v1/completions", "prompt_embeds", "AAAA"),
    ("/v1/completions", "logprob_token_ids", [1, 2, 3]),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/chat/completions", "vllm_xargs", {"distillgame_mode": "none"}),
    ("/v1/chat/completions", "kv_transfer_params", {}),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "logprob_token_ids", [1]),
])
def test_engine_and_unlisted_fields_are_refused_by_name(tmp_path, path, field, value):
    client, seen = _stand_in(tmp_path)
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    err = _error(client.post(path, headers=STANDARD, json={**body, field: value}), 400)
    assert err["param"] == field and f"'{field}'" in err["message"]
    assert seen == []


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 0}, "prompt_logprobs", "logprobs_refused"),
    ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs", "logprobs_refused"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 0}, "echo", "logprobs_refused"),
    # vLLM's chat turns echo + top_logprobs into prompt logprobs even without logprobs=true.
    ("/v1/chat/completions", {"echo": True, "top_logprobs": 1}, "echo", "logprobs_refused"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "invalid_parameter"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 6}, "logprobs", "invalid_parameter"),
    # Strings and floats would be coerced by vLLM's models past the caps.
    ("/v1/completions", {"prompt": "hi", "logprobs": "20"}, "logprobs", "invalid_parameter"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs", "invalid_parameter"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5.0}, "max_tokens", "invalid_parameter"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n", "invalid_parameter"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, "stop", "invalid_parameter"),
])
def test_leaky_or_uncapped_requests_are_400(tmp_path, path, body, param, code):
    client, seen = _stand_in(tmp_path)
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    err = _error(client.post(path, headers=STANDARD, json=body), 400)
    assert (err["param"], err["code"]) == (param, code), err
    assert seen == []


def test_tier_caps_max_tokens_and_logprobs(tmp_path):
    client, seen = _stand_in(tmp_path)
    capped = {"Authorization": "Bearer sk-test-capped"}
    client.post("/v1/completions", headers=capped, json={"prompt": "hi", "max_tokens": 100})
    assert seen[-1]["max_tokens"] == 3
    client.post("/v1/completions", headers=capped, json={"prompt": "hi"})
    assert seen[-1]["max_tokens"] == 3
    client.post("/v1/chat/completions", headers=capped,
                json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 50})
    assert seen[-1]["max_completion_tokens"] == 3 and "max_tokens" not in seen[-1]
    client.post("/v1/chat/completions", headers=capped, json={"messages": [{"role": "user", "content": "hi"}]})
    assert seen[-1]["max_tokens"] == 3
    err = _error(client.post("/v1/completions", headers=capped, json={"prompt": "hi", "logprobs": 1}), 400)
    assert err["code"] == "logprobs_refused"


def test_keys_rate_limits_and_body_limits_are_the_servers(tmp_path):
    client, seen = _stand_in(tmp_path, max_body_bytes=1000)
    assert _error(client.get("/v1/models"), 401)["message"] == "missing API key"
    assert _error(client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)["type"] == \
        "authentication_error"
    assert client.get("/health").status_code == 200
    assert client.get("/v1/defense", headers=STANDARD).json()["gamma"] == GAMMA
    limited = {"Authorization": "Bearer sk-test-limited"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", headers=limited, json=chat).status_code == 200
    r = client.post("/v1/chat/completions", headers=limited, json=chat)
    assert _error(r, 429)["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    assert _error(client.post("/v1/completions", headers=STANDARD, json={"prompt": "x" * 2000}), 413)
    assert _error(client.post("/v1/completions", headers=STANDARD, content=b"{not json"), 400)
    assert _error(client.post("/v1/completions", headers=STANDARD, json=[1, 2]), 400)
    assert len(seen) == 2  # /health and the first limited request


def test_health_is_ready_only_once_every_worker_is_defended(tmp_path):
    """Ready means defended: /health is 503 with the reason until the status call says every worker is live."""
    dead = {"configured": True, "live": 0, "speculative": False, "async_scheduling": False}
    client, _ = _stand_in(tmp_path, _Engine(statuses=[{**dead, "live": 1}, dead]))
    err = _error(client.get("/health"), 503)
    assert err["code"] == "defense_not_live" and "worker 1" in err["message"], err
    client, _ = _stand_in(tmp_path, _Engine(logprobs_mode="raw_logprobs"))
    assert "logprobs_mode" in _error(client.get("/health"), 503)["message"]
    client, _ = _stand_in(tmp_path, _Engine(ads_grad=None))
    assert "ADS gradient" in _error(client.get("/health"), 503)["message"]  # the policy has an ADS tier
    client, _ = _stand_in(tmp_path)
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert set(r.json()["defended_tiers"]) == {name for name, tier in _policy(tmp_path).tiers.items() if tier.defended}
    assert "open" not in r.json()["defended_tiers"]


class _DataParallelEngine(_Engine):
    """Two engine cores behind one client, answering as vLLM 0.32's data-parallel client does:
    ``collective_rpc`` returns the first core's workers only; ``engine_core.call_utility_all_async``
    returns each core's."""

    def __init__(self, per_core: list[list[dict]]) -> None:
        super().__init__(statuses=per_core[0])
        outer = self

        class _Cores:
            async def call_utility_all_async(self, method: str, *args: Any) -> list[list[dict]]:
                assert method == "collective_rpc" and args[0] in ("distillgame_status", "distillgame_fidelity")
                outer.calls += 1
                if args[0] == "distillgame_fidelity":
                    return [[{"poe": {"tokens": 3, "kl_sum": 0.1, "argmax_agree": 3}}] for _ in per_core]
                return per_core

        self.engine_core = _Cores()


def test_every_data_parallel_engine_core_must_be_defended(tmp_path):
    """Under data parallelism a core without a live processor blocks readiness, though the first core is live."""
    live = {"configured": True, "live": 1, "speculative": False, "async_scheduling": False}
    client, _ = _stand_in(tmp_path, _DataParallelEngine([[{**live, "dp_rank": 0}],
                                                         [{**live, "live": 0, "dp_rank": 1}]]))
    err = _error(client.get("/health"), 503)
    assert err["code"] == "defense_not_live" and "worker 1" in err["message"], err
    client, _ = _stand_in(tmp_path, _DataParallelEngine([[{**live, "dp_rank": 0}], [{**live, "dp_rank": 1}]]))
    r = client.get("/health")
    assert r.status_code == 200 and (r.json()["workers"], r.json()["engine_cores"]) == (2, 2), r.json()


@pytest.mark.parametrize("raw, param, code", [
    # Python's json takes these as floats; vLLM's models would too.
    (b'{"prompt": "hi", "temperature": NaN}', None, "invalid_json"),
    (b'{"prompt": "hi", "top_p": -Infinity}', None, "invalid_json"),
    (b'{"prompt": "hi", "temperature": 1e999}', None, "invalid_json"),
    # Deeper than the parser goes: a RecursionError, not a ValueError.
    (b'{"prompt": "hi", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "invalid_json"),
    # Lone surrogate escapes are JSON but no Unicode text: a tokenizer cannot encode them.
    (b'{"prompt": "lone \\ud800 surrogate"}', "prompt", "invalid_text"),
    (b'{"prompt": "hi", "stop": ["ok", "\\udfff"]}', "stop", "invalid_text"),
    (b'{"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"\\ud83d": 1}}}',
     "response_format", "invalid_text"),
])
def test_bodies_that_are_not_strict_json_text_are_400(tmp_path, raw, param, code):
    client, seen = _stand_in(tmp_path)
    err = _error(client.post("/v1/completions", headers={**STANDARD, "Content-Type": "application/json"},
                             content=raw), 400)
    assert (err["param"], err["code"]) == (param, code), err
    assert seen == []


def test_the_body_reaches_vllm_as_utf8_json_with_the_text_unchanged(tmp_path):
    client, seen = _stand_in(tmp_path)
    prompt = "h\u00e9llo \U0001F600 \u202e\u0000 end"
    r = client.post("/v1/completions", headers=STANDARD, json={"prompt": prompt, "temperature": 0.5})
    assert r.status_code == 200, r.text
    assert seen[-1]["prompt"] == prompt and seen[-1]["temperature"] == 0.5


def test_body_limits_come_from_the_environment_when_vllm_serve_passes_none(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_BODY_MB_ENV, "0.001")
    monkeypatch.setenv(BODY_TIMEOUT_ENV, "2.5")
    middleware = DefensePolicy(None, policy=_policy(tmp_path), metrics=ServerMetrics())
    assert (middleware._generation.max_bytes, middleware._generation.timeout_s) == (1048, 2.5)
    client, seen = _stand_in(tmp_path)
    assert _error(client.post("/v1/completions", headers=STANDARD, json={"prompt": "x" * 1100}), 413)
    assert client.post("/v1/completions", headers=STANDARD, json={"prompt": "x" * 900}).status_code == 200
    for bad in ("lots", "0", "-1", "inf"):
        monkeypatch.setenv(BODY_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=BODY_TIMEOUT_ENV):
            DefensePolicy(None, policy=_policy(tmp_path), metrics=ServerMetrics())


def test_unlisted_routes_and_methods_are_refused(tmp_path):
    client, seen = _stand_in(tmp_path)
    for path in ("/v1/responses", "/collective_rpc", "/openapi.json", "/v1/completions/", "/metrics/x"):
        assert _error(client.post(path, headers=STANDARD, json={}), 404)["type"] == "not_found_error"
    assert _error(client.get("/v1/completions", headers=STANDARD), 405)
    assert seen == []


@pytest.mark.parametrize("engine, reason", [
    (_Engine(logprobs_mode="raw_logprobs"), "processed_logprobs"),
    (_Engine(statuses=[{"configured": False, "live": 0, "speculative": False, "async_scheduling": False}]),
     "no additional_config['distillgame'] section"),
    (_Engine(statuses=[{"configured": True, "live": 0, "speculative": True, "async_scheduling": False}]),
     "speculative decoding"),
    (_Engine(statuses=[{"configured": True, "live": 1, "speculative": False, "async_scheduling": True}]),
     "async scheduling"),
])
def test_an_engine_that_would_serve_undefended_gets_503_for_defended_tiers(tmp_path, engine, reason):
    client, seen = _stand_in(tmp_path, engine=engine)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        err = _error(client.post("/v1/chat/completions", headers=STANDARD, json=chat), 503)
        assert err["code"] == "defense_not_live" and reason in err["message"], err
    # Asked once: the engine's settings do not change while it runs.
    assert engine.calls <= 1
    # The undefended tier is what it says it is, and is served.
    assert client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-test-open"},
                       json=chat).status_code == 200
    assert len(seen) == 1


def test_ads_tiers_get_503_on_an_engine_without_an_ads_gradient(tmp_path):
    client, seen = _stand_in(tmp_path, engine=_Engine(ads_grad=None))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    err = _error(client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-test-limited"}, json=chat), 503)
    assert "ADS gradient" in err["message"]
    assert client.post("/v1/chat/completions", headers=STANDARD, json=chat).status_code == 200
    assert len(seen) == 1


def test_an_exception_below_is_a_500_in_openai_shape_without_its_text_in_the_log(tmp_path, caplog):
    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("zebra-quokka secret prompt")

    app = Starlette(routes=[Route("/v1/models", boom)])
    app.add_middleware(DefensePolicy, policy=_policy(tmp_path), metrics=ServerMetrics())
    err = _error(TestClient(app).get("/v1/models", headers=STANDARD), 500)
    assert err["type"] == "server_error" and "zebra" not in err["message"]
    assert "zebra" not in caplog.text


# ---- one real vLLM server with the middleware -------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tiny_pair, tmp_path_factory):
    teacher, proxy = tiny_pair
    with serving(VllmServeProcess(tmp_path_factory.mktemp("vllm-serve"), teacher=teacher, proxy=proxy,
                                  dev_mode=True)) as srv:
        yield srv


def _sdk(base: str, key: str = "sk-test-standard") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _greedy_top_logprobs(client: openai.OpenAI, prompt_ids: list[int], max_tokens: int = 3, k: int = 5):
    r = client.completions.create(model="tiny-teacher", prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0,
                                  logprobs=k, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
    tops = [{int(t.split(":", 1)[1]): v for t, v in top.items()} for top in lp.top_logprobs]
    return ids, tops


def test_vllm_serve_poe_tier_releases_the_defended_distribution(vllm_server):
    import torch
    from transformers import AutoTokenizer

    from distillgame.plugins.reference import ReferenceModels

    base, teacher, proxy = vllm_server.base_url, vllm_server.teacher, vllm_server.proxy
    torch.set_num_threads(1)
    reference = ReferenceModels(teacher, proxy)
    prompt = AutoTokenizer.from_pretrained(str(teacher))("Natalia sold clips to", add_special_tokens=False)["input_ids"]
    ids, tops = _greedy_top_logprobs(_sdk(base), prompt, max_tokens=4)
    assert len(ids) == 4 and all(len(t) >= 5 for t in tops)
    worst, min_gap_teacher = 0.0, float("inf")
    for pos, top in enumerate(tops):
        prefix = prompt + ids[:pos]
        defended = reference.next_token_logprobs(prefix, {"mode": "poe", "gamma": GAMMA})
        undefended = reference.next_token_logprobs(prefix, {"mode": "none"})
        assert ids[pos] == int(defended.argmax())
        worst = max(worst, max(abs(v - defended[t].item()) for t, v in top.items()))
        min_gap_teacher = min(min_gap_teacher, max(abs(v - undefended[t].item()) for t, v in top.items()))
    assert worst < 1e-4, worst
    assert min_gap_teacher > 1e-2, min_gap_teacher
    # The open tier (mode none) is the teacher itself, through the same server.
    _, open_tops = _greedy_top_logprobs(_sdk(base, "sk-test-open"), prompt, max_tokens=1)
    undefended = reference.next_token_logprobs(prompt, {"mode": "none"})
    assert max(abs(v - undefended[t].item()) for t, v in open_tops[0].items()) < 1e-4


def test_vllm_serve_caller_fields_cannot_change_the_defense(vllm_server):
    base = vllm_server.base_url
    client = _sdk(base)
    for extra in ({"vllm_xargs": {"distillgame_mode": "none"}}, {"vllm_xargs": {"distillgame_gamma": 0.0}},
                  {"extra_args": {"distillgame": {"mode": "none"}}}, {"logits_processors": ["a:B"]},
                  {"distillgame_mode": "none"}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-teacher", prompt="hi", max_tokens=1, extra_body=extra)
        assert err.value.body["param"] in extra, err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-teacher", prompt="hi", max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert err.value.body["code"] == "logprobs_refused"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-teacher", prompt="hi", max_tokens=1, echo=True, logprobs=1)
    with pytest.raises(openai.AuthenticationError):
        _sdk(base, "sk-wrong").completions.create(model="tiny-teacher", prompt="hi", max_tokens=1)
    # The capped tier is truncated, not refused; chat works through vLLM's own handler.
    r = _sdk(base, "sk-test-capped").chat.completions.create(
        model="tiny-teacher", messages=[{"role": "user", "content": "Natalia sold"}], max_tokens=50)
    assert r.usage.completion_tokens <= 3


def test_vllm_serve_grammar_masks_survive_the_mix(vllm_server):
    """A JSON-schema response under PoE: vLLM's grammar mask reaches the teacher logits before the mix."""
    base = vllm_server.base_url
    schema = {"type": "string", "enum": ["yes", "no"]}
    for seed in range(3):
        r = _sdk(base).chat.completions.create(
            model="tiny-teacher", messages=[{"role": "user", "content": "Natalia sold clips?"}], max_tokens=8,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert json.loads(r.choices[0].message.content) in ("yes", "no"), r.choices[0].message.content


def test_vllm_serve_refuses_every_route_off_the_allowlist(vllm_server, monkeypatch):
    """Every route of vLLM's app (built in-process with the server's own flags) is refused unless allowlisted."""
    base = vllm_server.base_url
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    app = vllm_app(vllm_server.teacher)
    routes: set[tuple[str, str]] = set()
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", "x", getattr(route, "path", ""))
        for method in getattr(route, "methods", None) or {"GET", "POST"}:
            if method != "HEAD":
                routes.add((path, method))
    assert {("/v1/chat/completions", "POST"), ("/collective_rpc", "POST"), ("/v1/responses", "POST"),
            ("/inference/v1/generate", "POST"), ("/pause", "POST")} <= routes, sorted(routes)
    refused = 0
    with httpx.Client(base_url=base, headers=STANDARD, timeout=30) as http:
        for path, method in sorted(routes):
            if method in ROUTES.get(path, ()):
                continue
            r = http.request(method, path, json={})
            expected = 404 if path not in ROUTES else 405
            _error(r, expected)
            refused += 1
        assert refused >= 50, refused
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-teacher"
        assert http.post("/tokenize", json={"model": "tiny-teacher", "prompt": "hi"}).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
    assert "distillgame_requests_total" in metrics and "vllm:" in metrics


@pytest.mark.slow
def test_vllm_serve_without_the_defense_config_refuses_defended_tiers(tiny_pair, tmp_path):
    """Today's failure mode, `vllm serve` with no `distillgame` section, now answers 503 instead of the teacher."""
    teacher, proxy = tiny_pair
    srv = VllmServeProcess(tmp_path, teacher=teacher, proxy=proxy, defended=False)
    with serving(srv, want_health=503) as srv:
        base = srv.base_url
        health = httpx.get(f"{base}/health").json()["error"]
        assert health["code"] == "defense_not_live" and "no additional_config" in health["message"], health
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as err:
                _sdk(base).completions.create(model="tiny-teacher", prompt="hi", max_tokens=1)
            assert err.value.status_code == 503
            assert "no additional_config['distillgame'] section" in err.value.body["message"], err.value.body
        r = _sdk(base, "sk-test-open").completions.create(model="tiny-teacher", prompt="hi", max_tokens=1)
        assert r.usage.completion_tokens == 1
