"""Policy, protocol and metrics pieces of the server, without an engine (fast)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from distillgame.server.metrics import ServerMetrics
from distillgame.server.policy import (
    DEFAULT_GAMMA,
    DEFAULT_KL_BUDGET,
    AuthError,
    Policy,
    RateLimiter,
    default_policy,
    load_policy,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "server" / "policy.example.toml"


def test_default_policy_needs_no_key_and_defends_with_poe():
    policy = default_policy()
    tier = policy.authenticate(None)
    assert tier.defense.extra_args() == {"distillgame": {"mode": "poe", "gamma": DEFAULT_GAMMA}}
    assert tier.public()["kl_budget"] == DEFAULT_KL_BUDGET
    # SDKs always send some key; with no keys configured it is ignored, not a 401.
    assert policy.authenticate("none") is tier


def test_unknown_key_is_refused_even_with_an_anonymous_tier(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('anonymous_tier = "free"\n[tiers.free]\ndefense = { mode = "poe", gamma = 0.9 }\n'
                    '[tiers.paid]\ndefense = { mode = "poe", gamma = 0.5 }\n[[keys]]\nkey = "sk-paid"\ntier = "paid"\n')
    policy = load_policy(path)
    assert policy.authenticate(None).name == "free"
    assert policy.authenticate("sk-paid").name == "paid"
    # A key the provider never issued is a mistake worth surfacing, not a silent downgrade.
    with pytest.raises(AuthError):
        policy.authenticate("sk-pai")


def test_example_policy_maps_plain_and_hashed_keys_to_tiers():
    policy = load_policy(EXAMPLE)
    assert policy.requires_key
    assert policy.authenticate("test").name == "free"  # stored as a sha256 digest
    standard = policy.authenticate("sk-standard-example")
    assert standard.defense.public() == {"mode": "poe", "gamma": DEFAULT_GAMMA}
    assert standard.public()["kl_budget"] == DEFAULT_KL_BUDGET  # the example's standard tier is the calibrated default
    with pytest.raises(AuthError):
        policy.authenticate(None)
    with pytest.raises(AuthError):
        policy.authenticate("sk-standard-exampl")
    assert policy.tiers["internal"].defense.extra_args() == {"distillgame": {"mode": "none"}}


def test_policy_public_view_holds_no_secrets():
    policy = load_policy(EXAMPLE)
    view = str(policy.authenticate("sk-standard-example").public())
    assert "sk-standard-example" not in view and hashlib.sha256(b"test").hexdigest() not in view
    assert "sk-standard-example" not in repr(policy)


def test_policy_file_errors_fail_at_load(tmp_path):
    bad = {
        "gamma out of range": '[tiers.a]\ndefense = { mode = "poe", gamma = 1.5 }\n[[keys]]\nkey = "k"\ntier = "a"\n',
        "unknown tier": '[tiers.a]\ndefense = { mode = "none" }\n[[keys]]\nkey = "k"\ntier = "b"\n',
        "bad digest": '[tiers.a]\ndefense = { mode = "none" }\n[[keys]]\nsha256 = "xyz"\ntier = "a"\n',
        "no way in": '[tiers.a]\ndefense = { mode = "none" }\n',
        "unknown field": '[tiers.a]\ndefense = { mode = "poe", gamma = 0.5, beta = 1 }\nanonymous_tier = "a"\n',
    }
    for name, text in bad.items():
        path = tmp_path / "p.toml"
        path.write_text(text)
        with pytest.raises(ValidationError):
            load_policy(path)
        assert name


def test_yaml_policy_is_read_like_toml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("tiers:\n  a:\n    defense: {mode: ads, lam: 0.05, eps: 0.0001}\nanonymous_tier: a\n")
    policy = load_policy(path)
    assert policy.authenticate(None).defense.public() == {"mode": "ads", "lam": 0.05, "eps": 0.0001}
    assert isinstance(policy, Policy)


def test_rate_limiter_uses_a_sliding_minute():
    limiter = RateLimiter()
    assert limiter.allow("a", 2, now=0.0) and limiter.allow("a", 2, now=1.0)
    assert not limiter.allow("a", 2, now=59.0)
    assert limiter.allow("b", 2, now=59.0)
    assert limiter.allow("a", 2, now=60.5)
    assert limiter.allow("a", None, now=0.0)


@pytest.mark.parametrize("field", ["vllm_xargs", "extra_args", "defense", "logits_processors", "distillgame"])
def test_requests_refuse_engine_fields(field):
    from distillgame.server.gateway import GatewayError, _check_chat, _check_completion

    tier = default_policy().tiers["default"]
    with pytest.raises(GatewayError) as err:
        _check_completion({"prompt": "hi", field: {"mode": "none"}}, tier)
    assert err.value.status == 400 and err.value.param == field
    with pytest.raises(GatewayError) as err:
        _check_chat({"messages": [{"role": "user", "content": "hi"}], field: {}}, tier)
    assert err.value.param == field


def test_fidelity_counters_become_increments_across_engine_restarts():
    m = ServerMetrics()
    m.record_fidelity({"poe": {"tokens": 10, "kl_sum": 2.0, "argmax_agree": 8}}, engine_id=1)
    m.record_fidelity({"poe": {"tokens": 30, "kl_sum": 5.0, "argmax_agree": 20}}, engine_id=1)
    # A rebuilt engine counts from zero again; its counts add, they don't replace.
    m.record_fidelity({"poe": {"tokens": 10, "kl_sum": 1.0, "argmax_agree": 10}}, engine_id=2)
    text = m.render().decode()
    assert 'distillgame_fidelity_tokens_total{mode="poe"} 40.0' in text
    assert 'distillgame_fidelity_kl_per_token{mode="poe"} 0.15' in text
    assert 'distillgame_fidelity_argmax_agreement{mode="poe"} 0.75' in text
