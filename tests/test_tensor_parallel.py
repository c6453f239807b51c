"""The defense under vLLM's tensor parallelism (TP = 2), on both proxy runners, against the float64 oracle.

vLLM's CPU backend runs TP = 2 here: two workers, one core each, gloo between
them. On a machine with one NUMA node it needs ``VLLM_CPU_OMP_THREADS_BIND``
(``0|1``: one core per worker); without it the engine core dies at start
("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so
``EngineConfig`` sets it for the engine it builds, and ``distillgame serve``
for the server it starts, unless the caller set one.

The pair has 4 query and 2 KV heads, so each rank holds half of every
attention layer, the teacher's and (on the vllm runner) the proxy's. One
engine per PoE runner, each with one ADS method (jvp, fd). Checked: every
released token's logprob (none, PoE, ADS rows mixed, staggered arrivals) is the
oracle's within 1e-4, with a KV cache small enough that the scheduler
preempts and replays rows; both ranks report a live processor; the fidelity
counters, summed over the workers as the server sums them, count each released
token once.

Not for: pipeline parallelism, which the plugin refuses (``test_vllm_plugin.py``).
"""

from __future__ import annotations

import os
import random

import pytest
from safetensors.torch import load_file

from distillgame.engine import CPU_BIND_ENV, EngineConfig, build_llm, cpu_thread_binding
from distillgame.plugins.reference import ReferenceModels
from engine_helpers import Job, num_preemptions, run_staggered, shutdown, worst_error
from tiny_models import make_early_exit, make_llama, make_tokenizer

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


@pytest.fixture(scope="module")
def split_grad(split_pair, tiny_traces, tmp_path_factory):
    """The split proxy's ADS gradient, made by the real CLI."""
    from distillgame.cli import main

    path = tmp_path_factory.mktemp("tp-grad") / "proxy.safetensors"
    assert main(["ads-grad", "--proxy", str(split_pair[1]), "--traces", str(tiny_traces), "--out", str(path)]) == 0
    return path


# PoE's proxy on each runner; ADS's proxy side in each method (forward mode, finite differences).
ENGINES = [("vllm", "jvp"), ("transformers", "fd")]


@pytest.fixture(scope="module", params=ENGINES, ids=[f"{r}-{m}" for r, m in ENGINES])
def tp_llm(request, split_pair, split_grad):
    """A TP = 2 engine built as any launcher builds it: the thread binding is ``EngineConfig``'s to set."""
    teacher, proxy = split_pair
    runner, method = request.param
    assert os.environ.get(CPU_BIND_ENV, "auto") == "auto"
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), ads_grad=str(split_grad), dtype="float32",
                                 max_model_len=128, max_num_seqs=8, memory_share=0.08, proxy_runner=runner,
                                 extra_defense={"ads_method": method}, tensor_parallel_size=TP,
                                 # 8 blocks of 32 tokens for 8 rows of up to 70: the scheduler preempts.
                                 num_gpu_blocks_override=8, engine_overrides={"block_size": 32},
                                 disable_log_stats=False))
    assert os.environ.get(CPU_BIND_ENV, "auto") == "auto"  # set for the engine's workers only
    yield runner, method, llm
    shutdown(llm)


def test_each_worker_gets_its_own_cores():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_thread_binding(4, [6, 7]) == "6|7|6|7"
    with pytest.raises(ValueError):
        cpu_thread_binding(2, [])


def test_the_launchers_set_the_binding_unless_the_caller_did(split_pair, monkeypatch, tmp_path):
    """``distillgame serve --tensor-parallel-size 2`` hands vLLM's server the flag and, on one NUMA node, the binding;
    with a node per worker it leaves vLLM's own per-node binding alone. Both branches run on any machine: the node
    count is set here."""
    import argparse

    from distillgame import engine
    from distillgame.server import cli
    from distillgame.server.policy import default_policy

    monkeypatch.setattr(engine, "_numa_nodes", lambda: 1)
    monkeypatch.delenv(CPU_BIND_ENV, raising=False)
    teacher, proxy = split_pair
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--teacher", str(teacher), "--proxy", str(proxy), "--tensor-parallel-size",
                              str(TP)])
    policy = default_policy(0.5)
    command = cli.server_command(args, cli.engine_config(args, policy), policy, tmp_path)
    assert command.argv[command.argv.index("--tensor-parallel-size") + 1] == str(TP)
    assert command.env[CPU_BIND_ENV].count("|") == TP - 1
    monkeypatch.setenv(CPU_BIND_ENV, "0|0")
    command = cli.server_command(args, cli.engine_config(args, policy), policy, tmp_path)
    assert command.env[CPU_BIND_ENV] == "0|0"
    args = parser.parse_args(["serve", "--teacher", str(teacher), "--proxy", str(proxy)])
    monkeypatch.delenv(CPU_BIND_ENV)
    command = cli.server_command(args, cli.engine_config(args, policy), policy, tmp_path)
    assert "--tensor-parallel-size" not in command.argv and CPU_BIND_ENV not in command.env
    # A NUMA node per worker: vLLM binds each worker to its node itself, so no binding is set.
    monkeypatch.setattr(engine, "_numa_nodes", lambda: TP)
    args = parser.parse_args(["serve", "--teacher", str(teacher), "--proxy", str(proxy), "--tensor-parallel-size",
                              str(TP)])
    command = cli.server_command(args, cli.engine_config(args, policy), policy, tmp_path)
    assert command.argv[command.argv.index("--tensor-parallel-size") + 1] == str(TP)
    assert CPU_BIND_ENV not in command.env


def _jobs(vocab: int) -> list[Job]:
    rng = random.Random(7)
    defenses = [{"mode": "poe", "gamma": 0.65}, {"mode": "none"}, {"mode": "ads", "lam": 0.1, "eps": 1e-2},
                {"mode": "poe", "gamma": 0.3}]
    return [Job(prompt=[rng.randrange(4, vocab) for _ in range(rng.randint(3, 30))], defense=defenses[i % 4],
                max_tokens=rng.randint(24, 40), temperature=0.8 if i % 2 else 0.0, seed=500 + i if i % 2 else None,
                arrive_at_step=rng.choice([0, 0, 3, 6]))
            for i in range(8)]


def test_the_defense_under_tensor_parallelism_holds_the_oracle_and_counts_tokens_once(tp_llm, split_pair,
                                                                                      split_grad):
    runner, method, llm = tp_llm
    statuses = llm.collective_rpc("distillgame_status")
    assert len(statuses) == TP and all(s["configured"] and s["live"] >= 1 for s in statuses), statuses
    paged = "DistillgameDefendedForCausalLM" in llm.llm_engine.vllm_config.model_config.hf_config.architectures
    assert paged == (runner == "vllm")

    def tokens(mode: str) -> int:
        return sum(worker[mode]["tokens"] for worker in llm.collective_rpc("distillgame_fidelity"))

    before = {m: tokens(m) for m in ("poe", "ads")}
    preempted = num_preemptions(llm)
    jobs = _jobs(vocab=380)
    run_staggered(llm, jobs)
    assert num_preemptions(llm) > preempted, "8 blocks of 32 for 8 rows of 27-70 tokens must preempt"
    for mode in ("poe", "ads"):
        assert tokens(mode) - before[mode] == sum(j.max_tokens for j in jobs if j.defense["mode"] == mode), mode
    ref = ReferenceModels(*split_pair, ads_grad=load_file(str(split_grad)))
    for mode in ("none", "poe", "ads"):
        err = worst_error(ref, [j for j in jobs if j.defense["mode"] == mode])
        print(f"TP={TP}, {runner} runner, ADS {method}: {mode} worst |engine - oracle| logprob {err:.2e}")
        assert err < TOL, (mode, err)
    # The ADS rows are not the teacher's: the check above would see a dropped tilt.
    assert worst_error(ref, [j for j in jobs if j.defense["mode"] == "ads"], defense_override={"mode": "none"}) > 1e-3


def _checkpoint_bytes(folder, keep=lambda name: True) -> int:
    tensors = load_file(str(folder / "model.safetensors"))
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if keep(name))


def test_each_rank_holds_its_shard_of_the_weights_and_the_proxy_where_its_runner_puts_it(tp_llm, split_pair):
    """Per rank: the teacher's sharded layers (every matrix split in two, the norms whole), and the proxy
    sharded the same way on the vllm runner, or whole beside the engine on every rank on transformers."""
    runner, _, llm = tp_llm
    teacher, proxy = split_pair
    ranks = sorted(llm.collective_rpc("distillgame_weight_bytes"), key=lambda r: r["tp_rank"])
    assert [r["tp_rank"] for r in ranks] == list(range(TP))
    assert ranks[0]["teacher_bytes"] == ranks[1]["teacher_bytes"]
    whole = lambda name: name.endswith("norm.weight")  # noqa: E731
    matrices = _checkpoint_bytes(teacher, lambda n: not whole(n))
    # vLLM pads the vocabulary to a multiple of 64 per shard; everything else splits exactly.
    assert matrices / TP <= ranks[0]["teacher_bytes"] - _checkpoint_bytes(teacher, whole) <= matrices / TP * 1.2
    proxy_total = _checkpoint_bytes(proxy)
    for rank in ranks:
        if runner == "vllm":
            assert proxy_total / TP <= rank["proxy_bytes"] < proxy_total * 0.7
        else:
            assert rank["proxy_bytes"] == 0
        # ADS's proxy (and PoE's on transformers) is a whole torch copy on every rank.
        assert rank["proxy_beside_bytes"] == proxy_total


def test_the_shared_trunk_under_tensor_parallelism_holds_the_oracle(split_pair, tmp_path):
    """An early exit of the split teacher, its head sharded over the ranks, read off the teacher's trunk."""
    teacher, _ = split_pair
    proxy = make_early_exit(teacher, tmp_path / "exit")
    llm = build_llm(EngineConfig(teacher=str(teacher), proxy=str(proxy), dtype="float32", max_model_len=128,
                                 max_num_seqs=8, memory_share=0.08, tensor_parallel_size=TP,
                                 num_gpu_blocks_override=8, engine_overrides={"block_size": 32}))
    try:
        layouts = llm.collective_rpc("distillgame_kv_layout")
        assert [layout["shared_trunk_layer"] for layout in layouts] == [1] * TP
        jobs = [j for j in _jobs(vocab=380) if j.defense["mode"] != "ads"]
        run_staggered(llm, jobs)
        err = worst_error(ReferenceModels(teacher, proxy), jobs)
        print(f"TP={TP}, shared trunk: worst |engine - oracle| logprob {err:.2e}")
        assert err < TOL
    finally:
        shutdown(llm)
