"""The defense never goes silent: engine settings it does not run under are refused, failures fail closed.

Three layers are checked here:
- the processor alone, built on a plain config object around the tiny pair
  (start-up refusals, a NaN proxy, slot reuse, Model Runner V2's loader);
- the shared tiny engine (vLLM's hard masks survive the mix at gamma = 1);
- two engines of their own: chunked prefill (only released tokens are
  counted, tokens still match the oracle) and speculative decoding (refused).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from distillgame.engine import DefenseNotLive, EngineConfig, build_llm, verify_defense_live
from distillgame.plugins.processor import DefenseLogitsProcessor, check_engine, status_rpc
from distillgame.plugins.reference import ReferenceModels
from distillgame.plugins.vllm_plugin import DefenseConfigError
from engine_helpers import Job, run_staggered, shutdown, worst_error

TOL = 1e-4
POE = {"distillgame": {"mode": "poe", "gamma": 0.65}}


def fake_config(teacher: Path, proxy: Path, *, section: bool = True, max_model_len: int = 128,
                async_scheduling: bool = False, prompt_embeds: bool = False, speculative: object = None,
                max_num_seqs: int = 4) -> SimpleNamespace:
    """The parts of a ``VllmConfig`` the processor reads, around real model folders."""
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    model_config = SimpleNamespace(tokenizer=str(teacher), dtype=torch.float32, max_model_len=max_model_len,
                                   enable_prompt_embeds=prompt_embeds, get_vocab_size=lambda: vocab)
    return SimpleNamespace(
        additional_config={"distillgame": {"proxy": str(proxy)}} if section else {},
        model_config=model_config,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, async_scheduling=async_scheduling),
        speculative_config=speculative,
    )


def add(index: int, prompt: list[int], output: list[int], extra_args=POE) -> BatchUpdate:
    return BatchUpdate(batch_size=index + 1, removed=[], moved=[],
                       added=[(index, SamplingParams(extra_args=extra_args), prompt, output)])


@pytest.fixture(scope="module")
def nan_proxy(tiny_pair, tmp_path_factory) -> tuple[Path, int]:
    """The tiny proxy with one token's embedding set to NaN: any row that has read it overflows."""
    _, proxy = tiny_pair
    out = tmp_path_factory.mktemp("nan-proxy")
    for f in proxy.iterdir():
        shutil.copy(f, out / f.name)
    weights = load_file(str(out / "model.safetensors"))
    token = 42
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, token


# --- start-up refusals -------------------------------------------------------------------


def test_defended_engines_run_without_async_scheduling_and_refuse_it(tiny_pair, tiny_llm):
    """Async scheduling (vLLM's GPU default) would hand the processor -1 placeholders: never run it."""
    teacher, proxy = tiny_pair
    assert tiny_llm.llm_engine.vllm_config.scheduler_config.async_scheduling is False
    with pytest.raises(ValueError, match="async scheduling"):
        DefenseLogitsProcessor(fake_config(teacher, proxy, async_scheduling=True), torch.device("cpu"), False)
    with pytest.raises(ValueError, match="async scheduling"):
        check_engine(fake_config(teacher, proxy, async_scheduling=True))


def test_every_worker_of_the_shared_engine_reports_a_live_processor(tiny_llm):
    statuses = tiny_llm.collective_rpc(status_rpc)
    assert statuses == [{"configured": True, "live": 1, "speculative": False, "async_scheduling": False,
                         "dp_rank": 0, "tp_rank": 0}]
    verify_defense_live(statuses)


@pytest.mark.parametrize(
    "status, reason",
    [
        ({"configured": True, "live": 0, "speculative": True}, "speculative decoding"),
        ({"configured": False, "live": 0, "speculative": False}, "no additional_config"),
        ({"configured": True, "live": 0, "speculative": False}, "no defense processor"),
    ],
)
def test_a_worker_without_a_live_processor_blocks_the_engine(status, reason):
    with pytest.raises(DefenseNotLive, match=reason):
        verify_defense_live([{"configured": True, "live": 1, "speculative": False}, status])
    with pytest.raises(DefenseNotLive):
        verify_defense_live([])


def test_max_model_len_beyond_the_proxys_positions_is_refused(tiny_pair):
    teacher, proxy = tiny_pair  # both have 1024 positions
    with pytest.raises(ValueError, match="max_position_embeddings 1024"):
        DefenseLogitsProcessor(fake_config(teacher, proxy, max_model_len=2048), torch.device("cpu"), False)
    DefenseLogitsProcessor(fake_config(teacher, proxy, max_model_len=1024), torch.device("cpu"), False)


def test_proxy_whose_vocabulary_misses_tokenizer_ids_is_refused(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, proxy = tiny_pair
    n_ids = len(AutoTokenizer.from_pretrained(str(teacher)))
    short = AutoModelForCausalLM.from_pretrained(str(proxy))
    short.resize_token_embeddings(n_ids - 10)
    short.save_pretrained(str(tmp_path / "short"))
    AutoTokenizer.from_pretrained(str(proxy)).save_pretrained(str(tmp_path / "short"))
    with pytest.raises(ValueError, match=f"does not cover the teacher tokenizer's {n_ids} ids"):
        DefenseLogitsProcessor(fake_config(teacher, tmp_path / "short"), torch.device("cpu"), False)


def test_prompt_embeds_are_refused_at_start_and_per_request(tiny_pair):
    teacher, proxy = tiny_pair
    with pytest.raises(ValueError, match="enable_prompt_embeds"):
        DefenseLogitsProcessor(fake_config(teacher, proxy, prompt_embeds=True), torch.device("cpu"), False)
    proc = DefenseLogitsProcessor(fake_config(teacher, proxy), torch.device("cpu"), False)
    with pytest.raises(ValueError, match="prompt token ids"):
        proc.update_state(add(0, None, []))
    # An undefended row without token ids is not the defense's business.
    proc.update_state(add(0, None, [], extra_args=None))


# --- failures in a step ------------------------------------------------------------------


def test_nan_from_the_proxy_fails_the_step_instead_of_releasing_the_teacher(tiny_pair, nan_proxy):
    teacher, _ = tiny_pair
    proxy, token = nan_proxy
    proc = DefenseLogitsProcessor(fake_config(teacher, proxy), torch.device("cpu"), False)
    logits = torch.randn(1, proc.vocab)
    proc.update_state(add(0, [5, 6, 7], []))  # a row that never reads the NaN token is served
    assert torch.isfinite(proc.apply(logits.clone())).all()
    proc.update_state(add(1, [5, token, 7], []))
    logits = torch.randn(2, proc.vocab)
    before = logits.clone()
    with pytest.raises(RuntimeError, match="NaN or inf"):
        proc.apply(logits)
    assert torch.equal(logits, before), "a failed step must not leave a half-written row behind"


def test_a_reused_slot_carries_nothing_of_its_previous_request(tiny_pair):
    teacher, proxy = tiny_pair
    proc = DefenseLogitsProcessor(fake_config(teacher, proxy, max_num_seqs=1), torch.device("cpu"), False)
    proc.update_state(add(0, [5, 6, 7, 8], []))
    proc.apply(torch.randn(1, proc.vocab))
    slot = proc.rows[0].slot
    assert torch.isfinite(proc.proxy.last[slot]).all() and proc.proxy.lengths[slot] == 4
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))
    proc.update_state(add(0, [9, 10], []))
    assert proc.rows[0].slot == slot
    assert proc.proxy.lengths[slot] == 0
    assert torch.isnan(proc.proxy.last[slot]).all()


# --- Model Runner V2 ---------------------------------------------------------------------


def test_model_runner_v2_loads_the_entry_point_and_stays_inert_unless_defended(tiny_pair):
    """Undefended engines (eval, the harness) must start under V2, the GPU default; defended ones refuse."""
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_plugins,
        build_custom_logits_processors_params_validator,
    )

    assert DefenseLogitsProcessor in _load_v2_logitsprocs_plugins()
    validate = build_custom_logits_processors_params_validator(None)
    validate(SamplingParams(extra_args=POE))
    teacher, proxy = tiny_pair
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4, vocab_size=384)
    inert = DefenseLogitsProcessor(fake_config(teacher, proxy, section=False), req_states)
    assert inert.add_request(0, SamplingParams(extra_args=POE)) is False
    logits = torch.randn(2, 384)
    assert inert.apply(logits, ctx=None) is logits
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        DefenseLogitsProcessor(fake_config(teacher, proxy), req_states)


# --- the shared engine: vLLM's hard masks ------------------------------------------------


def _proxy_favourites(tiny_llm, prompt: list[int], n: int = 12) -> set[int]:
    """The tokens PoE at gamma = 1 (the proxy alone) picks greedily from ``prompt``."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            extra_args={"distillgame": {"mode": "poe", "gamma": 1.0}})
    out = tiny_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return set(out[0].outputs[0].token_ids)


def _released(tiny_llm, prompt: list[int], **params) -> list[list[int]]:
    jobs = [SamplingParams(max_tokens=12, ignore_eos=True, extra_args={"distillgame": {"mode": "poe", "gamma": 1.0}},
                           temperature=t, seed=s, logprobs=3, **params) for t, s in ((0.0, None), (1.0, 7), (1.5, 8))]
    outs = tiny_llm.generate([{"prompt_token_ids": prompt}] * len(jobs), jobs, use_tqdm=False)
    released = []
    for out in outs:
        comp = out.outputs[0]
        released.append(list(comp.token_ids))
        for step in comp.logprobs:  # the reported top tokens are released tokens too
            released.append(list(step))
    return released


def test_allowed_token_ids_stay_enforced_at_gamma_one(tiny_llm):
    prompt = [7, 8, 9, 10, 11]
    favourites = _proxy_favourites(tiny_llm, prompt)
    allowed = [t for t in range(4, 380) if t not in favourites][:40]
    before = tiny_llm.collective_rpc("distillgame_fidelity")[0]["poe"]
    for tokens in _released(tiny_llm, prompt, allowed_token_ids=allowed):
        assert set(tokens) <= set(allowed), sorted(set(tokens) - set(allowed))
    after = tiny_llm.collective_rpc("distillgame_fidelity")[0]["poe"]
    assert after["tokens"] - before["tokens"] == 36
    assert math.isfinite(after["kl_sum"]) and after["kl_sum"] > before["kl_sum"]


def test_bad_words_stay_banned_at_gamma_one(tiny_llm):
    prompt = [12, 40, 41, 99, 100, 7]
    favourites = sorted(_proxy_favourites(tiny_llm, prompt))
    tokenizer = tiny_llm.get_tokenizer()  # vLLM's own wrapper, as the engine bans with
    words = [w for w in (tokenizer.decode([t]) for t in favourites) if w.strip()]
    probe = SamplingParams(bad_words=words)
    probe.update_from_tokenizer(tokenizer)
    banned = {ids[0] for ids in probe.bad_words_token_ids if len(ids) == 1}
    assert banned & set(favourites), "the probe must ban tokens the proxy would pick"
    for tokens in _released(tiny_llm, prompt, bad_words=words):
        assert not banned & set(tokens), sorted(banned & set(tokens))
    fidelity = tiny_llm.collective_rpc("distillgame_fidelity")[0]["poe"]
    assert math.isfinite(fidelity["kl_sum"])


# --- engines of their own ----------------------------------------------------------------


def test_chunked_prefill_counts_only_released_tokens_and_matches_the_oracle(tiny_pair):
    """Rows still inside their prompt are sampled and the token dropped: they are not released."""
    teacher, proxy = tiny_pair
    llm = build_llm(EngineConfig(
        teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128, max_num_seqs=4,
        kv_cache_bytes=32 << 20,
        # vLLM's GPU default; unseeded requests only (CPU generators cannot rewind, see engine.py).
        engine_overrides={"enable_chunked_prefill": True, "max_num_batched_tokens": 16},
    ))
    try:
        assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
        jobs = [Job(list(range(20, 80)), {"mode": "poe", "gamma": 0.65}, max_tokens=5),
                Job(list(range(100, 141)), {"mode": "poe", "gamma": 0.3}, max_tokens=6, arrive_at_step=1),
                Job([5, 6, 7], {"mode": "poe", "gamma": 1.0}, max_tokens=4)]
        before = llm.collective_rpc("distillgame_fidelity")[0]["poe"]["tokens"]
        steps = run_staggered(llm, jobs)
        after = llm.collective_rpc("distillgame_fidelity")[0]["poe"]["tokens"]
        assert steps > 9, "the 60-token prompt must take several 16-token chunks"
        assert after - before == 5 + 6 + 4
        assert worst_error(ReferenceModels(teacher, proxy), jobs) < TOL
    finally:
        shutdown(llm)


def test_speculative_decoding_with_the_defense_refuses_to_start(tiny_pair):
    teacher, proxy = tiny_pair
    config = EngineConfig(
        teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128, max_num_seqs=4,
        kv_cache_bytes=32 << 20,
        engine_overrides={"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                                 "prompt_lookup_max": 3, "prompt_lookup_min": 1}},
    )
    # The package's vLLM plugin refuses it while vLLM builds the configuration, before any model loads
    # (tests/test_vllm_plugin.py covers a plain vllm.EngineArgs too).
    with pytest.raises(DefenseConfigError, match="speculative decoding"):
        build_llm(config)
