"""The vLLM-layer proxy's plumbing: which engines get it, and the hand-over of the proxy's logits.

The engine paths (equivalence with the float64 oracle, preemption, the KV
layout) are in ``tests/test_poe_engine.py`` and ``tests/test_ads.py``, whose
shared engine runs this path.
"""

from __future__ import annotations

import json

import pytest
import torch

from distillgame.engine import EngineConfig
from distillgame.plugins.paged_proxy import ARCHITECTURE, TEACHER_ARCHITECTURES, ProxyLogits


def test_a_take_runs_the_head_on_the_asked_rows_once_and_refuses_anything_else():
    channel = ProxyLogits()
    rows = torch.tensor([2, 0])
    with pytest.raises(RuntimeError, match="no proxy states"):
        channel.take(2, rows)
    hidden, head = torch.randn(3, 4), torch.randn(4, 7)
    channel.put(hidden, lambda h: h @ head)
    with pytest.raises(RuntimeError, match="3 rows for a step sampling 2"):
        channel.take(2, rows)
    # The failed take emptied it too: a stale step never reaches the next one.
    with pytest.raises(RuntimeError, match="no proxy states"):
        channel.take(3, rows)
    channel.put(hidden, lambda h: h @ head)
    torch.testing.assert_close(channel.take(3, rows), hidden[rows] @ head, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no proxy states"):
        channel.take(3, rows)


def test_auto_runs_a_llama_proxy_on_vllm_layers_keeping_the_teachers_architecture(tiny_pair):
    teacher, proxy = tiny_pair
    config = EngineConfig(teacher=str(teacher), proxy=str(proxy))
    overrides = config.engine_kwargs()["hf_overrides"]
    assert overrides == {"architectures": [ARCHITECTURE], TEACHER_ARCHITECTURES: ["LlamaForCausalLM"]}
    config.proxy_runner = "transformers"
    assert "hf_overrides" not in config.engine_kwargs()
    # An engine that serves no PoE keeps the proxy beside it for ADS alone,
    # unless the runner is named.
    config.proxy_runner, config.poe_served = "auto", False
    assert "hf_overrides" not in config.engine_kwargs()
    config.proxy_runner = "vllm"
    assert config.engine_kwargs()["hf_overrides"] == overrides
    config.proxy_runner = "paged"
    with pytest.raises(ValueError, match="proxy_runner must be"):
        config.engine_kwargs()


def test_a_proxy_vllm_has_no_class_for_stays_on_transformers_or_is_refused(tiny_pair, tmp_path):
    teacher, proxy = tiny_pair
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((proxy / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchModelForCausalLM"]}))
    assert "hf_overrides" not in EngineConfig(teacher=str(teacher), proxy=str(odd)).engine_kwargs()
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM"):
        EngineConfig(teacher=str(teacher), proxy=str(odd), proxy_runner="vllm").engine_kwargs()


def test_serve_keeps_the_proxy_beside_the_engine_for_a_policy_without_poe(tiny_pair, tmp_path):
    from distillgame.cli import build_parser
    from distillgame.server.cli import engine_config
    from distillgame.server.policy import default_policy, load_policy

    teacher, proxy = tiny_pair
    ads_only = tmp_path / "ads.toml"
    ads_only.write_text('anonymous_tier = "t"\n[tiers.t.defense]\nmode = "ads"\nlam = 0.05\neps = 1e-4\n')
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(ads_only.read_text() + '[tiers.p.defense]\nmode = "poe"\ngamma = 0.5\n')

    def kwargs(policy, *flags):
        args = build_parser().parse_args(["serve", "--teacher", str(teacher), "--proxy", str(proxy), *flags])
        return engine_config(args, policy).engine_kwargs()

    assert "hf_overrides" not in kwargs(load_policy(ads_only))
    assert kwargs(load_policy(mixed))["hf_overrides"]["architectures"] == [ARCHITECTURE]
    assert kwargs(default_policy())["hf_overrides"]["architectures"] == [ARCHITECTURE]
    # A named runner is the operator's choice, policy or not.
    assert kwargs(load_policy(ads_only), "--proxy-runner", "vllm")["hf_overrides"]["architectures"] == [ARCHITECTURE]
    # The shared trunk is on unless the operator turns it off.
    section = lambda *flags: kwargs(default_policy(), *flags)["additional_config"]["distillgame"]  # noqa: E731
    assert "shared_trunk" not in section() and section("--no-shared-trunk")["shared_trunk"] is False
