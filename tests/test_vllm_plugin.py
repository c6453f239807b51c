"""The package's vLLM plugin on engines built by anyone: what it sets, what it refuses.

These build vLLM's real ``VllmConfig`` from ``EngineArgs`` (as ``vllm serve``
and ``vllm.LLM`` do) on the tiny test pair, without starting an engine.
"""

from __future__ import annotations

import json

import pytest

from distillgame.plugins.vllm_plugin import WORKER_EXTENSION, DefenseConfigError


def _config(teacher, proxy=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    if proxy is not None:
        kwargs["additional_config"] = {"distillgame": {"proxy": str(proxy), **kwargs.pop("section", {})}}
    args = EngineArgs(model=str(teacher), max_model_len=128, enforce_eager=True, **kwargs)
    return args, args.create_engine_config()


def test_a_defended_engine_gets_what_the_defense_needs_without_flags(tiny_pair, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    teacher, proxy = tiny_pair
    _, config = _config(teacher, proxy)
    assert config.model_config.logprobs_mode == "processed_logprobs"
    assert config.scheduler_config.async_scheduling is False
    assert config.parallel_config.worker_extension_cls == WORKER_EXTENSION
    # PoE's proxy on vLLM's layers (the tiny proxy is a Llama, which vLLM has).
    assert config.model_config.hf_config.architectures == ["DistillgameDefendedForCausalLM"]
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_raw_logits_become_processed_logits_and_the_runner_choice_is_kept(tiny_pair):
    teacher, proxy = tiny_pair
    _, config = _config(teacher, proxy, logprobs_mode="raw_logits", section={"proxy_runner": "transformers"})
    assert config.model_config.logprobs_mode == "processed_logits"
    assert config.model_config.hf_config.architectures == ["LlamaForCausalLM"]


def test_an_engine_without_the_section_is_left_as_vllm_builds_it(tiny_pair):
    teacher, _ = tiny_pair
    _, config = _config(teacher)
    assert config.model_config.logprobs_mode == "raw_logprobs"
    assert config.parallel_config.worker_extension_cls == ""
    assert config.model_config.hf_config.architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize("kwargs, flag", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
     "--speculative-config"),
    ({"async_scheduling": True}, "--async-scheduling"),
    ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
    ({"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
    ({"worker_extension_cls": "some.other.Extension"}, "--worker-extension-cls"),
])
def test_settings_the_defense_cannot_run_under_are_refused_naming_the_flag(tiny_pair, kwargs, flag):
    teacher, proxy = tiny_pair
    with pytest.raises(DefenseConfigError, match=flag):
        _config(teacher, proxy, **kwargs)


def test_the_v2_model_runner_is_refused_naming_the_variable(tiny_pair, monkeypatch):
    teacher, proxy = tiny_pair
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(DefenseConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        _config(teacher, proxy)


def test_a_bad_section_is_refused_before_any_model_loads(tiny_pair):
    teacher, proxy = tiny_pair
    with pytest.raises(ValueError, match="unknown additional_config"):
        _config(teacher, proxy, section={"gama": 0.5})
    with pytest.raises(ValueError, match="proxy_runner"):
        _config(teacher, proxy, section={"proxy_runner": "paged"})


def test_the_server_flags_parse_back_to_the_engine_arguments(tiny_pair):
    """``distillgame serve`` hands vLLM's server ``EngineConfig.server_args()``: one source for both launchers."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from distillgame.engine import EngineConfig

    teacher, proxy = tiny_pair
    config = EngineConfig(teacher=str(teacher), proxy=str(proxy), max_model_len=128, max_num_seqs=4,
                          memory_share=0.07, kv_cache_bytes=1 << 26, dtype="float32")
    config.disable_log_stats = False  # as distillgame serve runs it: a plain switch, so left out
    kwargs = config.engine_kwargs()
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(config.server_args())
    args = AsyncEngineArgs.from_cli_args(parsed)
    for name, value in kwargs.items():
        got = getattr(args, name)
        if isinstance(value, dict):
            got = json.loads(got) if isinstance(got, str) else got
        assert got == value, (name, got, value)
    assert kwargs["additional_config"]["distillgame"]["proxy_runner"] == "vllm"
