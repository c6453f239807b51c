"""PoE under vLLM's tensor parallelism (TP = 2), on both proxy runners, against the float64 oracle.

vLLM's CPU backend runs TP = 2 here: two workers, one core each, gloo between
them. On a machine with one NUMA node it needs ``VLLM_CPU_OMP_THREADS_BIND``
(``0|1``: one core per worker); without it the engine core dies at start
("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers").

The pair has 4 query and 2 KV heads, so each rank holds half of every
attention layer, the teacher's and (on the vllm runner) the proxy's. Checked:
every released token's logprob is the oracle's within 1e-4 on staggered
arrivals; both ranks report a live processor; the fidelity counters, summed
over the workers as the server sums them, count each released token once.

Not for: pipeline parallelism, which the plugin refuses (``test_vllm_plugin.py``).
"""

from __future__ import annotations

import os
import random

import pytest

from distillgame.engine import EngineConfig, build_llm
from distillgame.plugins.reference import ReferenceModels
from engine_helpers import Job, run_staggered, shutdown, worst_error
from tiny_models import make_llama, make_tokenizer

TOL = 1e-4
TP = 2


@pytest.fixture(scope="module")
def split_pair(tmp_path_factory):
    """A tiny teacher and proxy whose 4 query and 2 KV heads split over two ranks."""
    root = tmp_path_factory.mktemp("tp")
    tok = make_tokenizer()
    teacher = make_llama(root / "teacher", tok, layers=2, hidden=128, heads=4, kv_heads=2, seed=3)
    proxy = make_llama(root / "proxy", tok, layers=1, hidden=128, heads=4, kv_heads=2, seed=4, vocab_pad=40)
    return teacher, proxy


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def tp_llm(request, split_pair):
    teacher, proxy = split_pair
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(TP))
    try:
        llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=256,
                                     max_num_seqs=8, memory_share=0.08, proxy_runner=request.param,
                                     engine_overrides={"tensor_parallel_size": TP}))
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield request.param, llm
    shutdown(llm)


def _jobs(vocab: int) -> list[Job]:
    rng = random.Random(7)
    defenses = [{"mode": "poe", "gamma": 0.65}, {"mode": "none"}, {"mode": "poe", "gamma": 0.3}]
    return [Job(prompt=[rng.randrange(4, vocab) for _ in range(rng.randint(3, 30))], defense=defenses[i % 3],
                max_tokens=rng.randint(6, 16), temperature=0.8 if i % 2 else 0.0, seed=500 + i if i % 2 else None,
                arrive_at_step=rng.choice([0, 0, 3, 6]))
            for i in range(6)]


def test_poe_under_tensor_parallelism_holds_the_oracle_and_counts_tokens_once(tp_llm, split_pair):
    runner, llm = tp_llm
    statuses = llm.collective_rpc("distillgame_status")
    assert len(statuses) == TP and all(s["configured"] and s["live"] >= 1 for s in statuses), statuses
    paged = "DistillgameDefendedForCausalLM" in llm.llm_engine.vllm_config.model_config.hf_config.architectures
    assert paged == (runner == "vllm")

    def poe_tokens() -> int:
        return sum(worker["poe"]["tokens"] for worker in llm.collective_rpc("distillgame_fidelity"))

    before = poe_tokens()
    jobs = _jobs(vocab=380)
    run_staggered(llm, jobs)
    released = sum(j.max_tokens for j in jobs if j.defense["mode"] == "poe")
    assert poe_tokens() - before == released
    err = worst_error(ReferenceModels(*split_pair), jobs)
    print(f"TP={TP}, {runner} runner: worst |engine - oracle| logprob {err:.2e}")
    assert err < TOL
