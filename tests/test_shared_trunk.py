"""The shared-trunk proxy: an early exit of the teacher read from the teacher's own forward.

The proxy here is the tiny teacher's first layer with a head of its own (a
final norm and an LM head unlike the teacher's), the shape of the embedded
proxy and of what ``distillgame proxy`` builds. The engine must find that it
is an early exit, run no proxy layers and store no proxy KV, and still
release exactly the float64 oracle's PoE distribution, which reads the proxy
folder as the plain model it is.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from vllm.v1.engine.exceptions import EngineDeadError
from safetensors.torch import load_file, save_file

from distillgame.engine import EngineConfig, build_llm
from distillgame.plugins.early_exit import find_early_exit
from distillgame.plugins.paged_proxy import PROXY_PREFIX, is_paged
from distillgame.plugins.reference import ReferenceModels
from engine_helpers import Job, num_preemptions, run_staggered, shutdown, worst_error
from tiny_models import make_early_exit

TOL = 1e-4
EXIT = 1


@pytest.fixture(scope="module")
def exit_pair(tiny_pair, tmp_path_factory) -> tuple[Path, Path]:
    teacher, _ = tiny_pair
    return teacher, make_early_exit(teacher, tmp_path_factory.mktemp("exit") / "proxy")


def _jobs(seed: int, n: int, vocab: int = 380) -> list[Job]:
    rng = random.Random(seed)
    defenses = [{"mode": "none"}, {"mode": "poe", "gamma": 0.3}, {"mode": "poe", "gamma": 0.65},
                {"mode": "poe", "gamma": 1.0}]
    return [Job(prompt=[rng.randrange(4, vocab) for _ in range(rng.randint(2, 40))], defense=defenses[i % 4],
                max_tokens=rng.randint(4, 24), temperature=0.8 if i % 2 else 0.0, seed=1000 + i if i % 2 else None,
                arrive_at_step=rng.choice([0, 0, 2, 5, 9])) for i in range(n)]


def test_an_early_exit_is_recognized_on_its_tensors_and_nothing_else_is(exit_pair, tiny_pair, tmp_path):
    teacher, proxy = exit_pair
    found, why = find_early_exit(teacher, proxy)
    assert found is not None and found.layer == EXIT and found.teacher_layers == 3, why
    assert set(found.head_tensors) == {"model.norm.weight", "lm_head.weight"} and not found.tied_head

    # The tiny pair's proxy is a model of its own (other weights, other vocabulary).
    assert find_early_exit(*tiny_pair)[0] is None

    # One changed value in one layer, or the same layers stored in another dtype: not the teacher's.
    for name, edit in (("one value", lambda t: t.index_put_((torch.tensor([0]),), t[0] + 1e-3)),
                       ("bf16", lambda t: t.to(torch.bfloat16))):
        bad = make_early_exit(teacher, tmp_path / name.replace(" ", "_"))
        tensors = load_file(str(bad / "model.safetensors"))
        key = "model.layers.0.mlp.down_proj.weight"
        tensors[key] = edit(tensors[key].clone()).contiguous()
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
        found, why = find_early_exit(teacher, bad)
        assert found is None and key in why, (name, why)

    # As deep as the teacher is not an exit.
    assert find_early_exit(teacher, teacher)[0] is None


@pytest.fixture(scope="module")
def shared_llm(exit_pair):
    teacher, proxy = exit_pair
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=256,
                                 max_num_seqs=16, memory_share=0.12, disable_log_stats=False,
                                 kv_cache_bytes=1 << 20))
    yield llm
    shutdown(llm)


def test_the_shared_trunk_runs_no_proxy_layers_and_keeps_the_teachers_kv_capacity(shared_llm):
    assert is_paged(shared_llm.llm_engine.vllm_config)
    layout = shared_llm.collective_rpc("distillgame_kv_layout")[0]
    assert layout["shared_trunk_layer"] == EXIT
    assert not [n for n in layout["layers"] if n.startswith(PROXY_PREFIX + ".")]
    # Every byte of the KV budget goes to the teacher's pages: its block count is the budget over them.
    per_block = sum(layer["page_bytes"] for layer in layout["layers"].values())
    assert layout["num_blocks"] == (1 << 20) // per_block


def test_shared_trunk_poe_matches_the_oracle_with_staggered_arrivals(shared_llm, exit_pair):
    ref = ReferenceModels(*exit_pair)
    jobs = _jobs(seed=5, n=12)
    run_staggered(shared_llm, jobs)
    err = worst_error(ref, jobs)
    print(f"shared trunk, staggered arrivals: worst |engine - oracle| logprob {err:.2e}")
    assert err < TOL
    # Not vacuous: the released PoE rows are not the teacher's distribution.
    poe = [j for j in jobs if j.defense["mode"] == "poe" and j.defense["gamma"] >= 0.65]
    assert worst_error(ref, poe, defense_override={"mode": "none"}) > 1e-2


def test_shared_trunk_poe_holds_across_prefix_cache_hits(shared_llm, exit_pair):
    """A second request on a cached prefix skips the teacher's forward over it: the proxy's state must come back
    through the teacher's KV alone."""
    ref = ReferenceModels(*exit_pair)
    block = shared_llm.llm_engine.vllm_config.cache_config.block_size
    prefix = [random.Random(9).randrange(4, 380) for _ in range(block + 3)]
    hits = lambda: sum(getattr(m, "value", 0) for m in shared_llm.get_metrics() if m.name == "vllm:prefix_cache_hits")
    first = Job(prefix + [11, 12], {"mode": "poe", "gamma": 0.65}, max_tokens=6)
    run_staggered(shared_llm, [first])
    before = hits()
    second = Job(prefix + [13], {"mode": "poe", "gamma": 0.65}, max_tokens=6, temperature=0.9, seed=4)
    run_staggered(shared_llm, [second])
    assert hits() - before >= block
    err = worst_error(ref, [first, second])
    print(f"shared trunk, prefix-cache hits: worst |engine - oracle| logprob {err:.2e}")
    assert err < TOL


def test_shared_trunk_poe_matches_the_oracle_under_preemption(exit_pair, shared_llm):
    teacher, proxy = exit_pair
    block = shared_llm.llm_engine.vllm_config.cache_config.block_size
    small = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=2 * block,
                                   max_num_seqs=16, memory_share=0.12, disable_log_stats=False,
                                   num_gpu_blocks_override=4))
    try:
        assert small.collective_rpc("distillgame_kv_layout")[0]["shared_trunk_layer"] == EXIT
        jobs = _jobs(seed=6, n=5)
        for job in jobs:
            job.max_tokens = block + 12 - len(job.prompt)
            job.arrive_at_step = 0
        run_staggered(small, jobs)
        assert num_preemptions(small) > 0
        err = worst_error(ReferenceModels(teacher, proxy), jobs)
        print(f"shared trunk, preemption: worst |engine - oracle| logprob {err:.2e}")
        assert err < TOL
    finally:
        shutdown(small)


def test_shared_trunk_off_runs_the_same_proxy_as_a_model_of_its_own(exit_pair):
    teacher, proxy = exit_pair
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128,
                                 max_num_seqs=8, memory_share=0.12, extra_defense={"shared_trunk": False}))
    try:
        layout = llm.collective_rpc("distillgame_kv_layout")[0]
        assert layout["shared_trunk_layer"] is None
        assert len([n for n in layout["layers"] if n.startswith(PROXY_PREFIX + ".")]) == EXIT
        jobs = _jobs(seed=7, n=4)
        run_staggered(llm, jobs)
        assert worst_error(ReferenceModels(teacher, proxy), jobs) < TOL
    finally:
        shutdown(llm)


def test_a_nan_in_the_shared_trunk_proxys_head_fails_the_step_and_releases_nothing(exit_pair, tmp_path):
    """Fail closed on this path too: the head's logits are checked before the mix, so a PoE row whose proxy
    answer is not finite stops the engine instead of releasing the teacher's (or a broken) distribution."""
    teacher, proxy = exit_pair
    broken = tmp_path / "nan-head"
    broken.mkdir()
    for f in proxy.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["lm_head.weight"][7] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert find_early_exit(teacher, broken)[0] is not None  # still an early exit: only its head is its own
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(broken), dtype="float32", max_model_len=128,
                                 max_num_seqs=4, memory_share=0.12))
    try:
        assert llm.collective_rpc("distillgame_kv_layout")[0]["shared_trunk_layer"] == EXIT
        plain = Job([5, 6, 7], {"mode": "none"}, max_tokens=4)
        run_staggered(llm, [plain])
        assert len(plain.tokens) == 4  # rows that never consult the proxy are served
        poe = Job([5, 6, 7], {"mode": "poe", "gamma": 0.65}, max_tokens=4)
        with pytest.raises(EngineDeadError):
            run_staggered(llm, [poe])
        assert poe.tokens == []
    finally:
        shutdown(llm)
