"""The defended step never makes the host wait for the device.

Counted with the processor's sync audit (``sync_audit`` in the defense
settings, :class:`~distillgame.plugins.transfers.SyncAudit`): every torch call
inside ``update_state``/``apply`` is seen, and those that read device values
on the host (``.item()``, ``.tolist()``, ``torch.equal``, boolean masks, ...)
or build tensors from host values outside the staging buffer are counted. On
CUDA the same audit runs the step under ``torch.cuda.set_sync_debug_mode("error")``
(``distillgame check --gpu`` runs this file there); here, on CPUs, everything
but that one call runs.

Three layers: the staging buffer alone, the processor on a plain config (PoE,
both ADS methods, slot reuse, moves, a replayed request, a row with nothing
new), and a real engine on the tiny pair (mixed batch with preemption, token
for token against the float64 oracle).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from distillgame import check
from distillgame.engine import EngineConfig, build_llm
from distillgame.plugins.processor import DefenseLogitsProcessor, sync_audit_rpc
from distillgame.plugins.reference import ReferenceModels
from distillgame.plugins.transfers import Staging, SyncAudit, to_host
from engine_helpers import Job, num_preemptions, run_staggered, shutdown, worst_error

TOL = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def plain_config(teacher: Path, section: dict, max_num_seqs: int = 4) -> SimpleNamespace:
    """The parts of a ``VllmConfig`` the processor reads, around real model folders."""
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    model_config = SimpleNamespace(tokenizer=str(teacher), dtype=torch.float32, max_model_len=128,
                                   enable_prompt_embeds=False, get_vocab_size=lambda: vocab)
    return SimpleNamespace(additional_config={"distillgame": section}, model_config=model_config,
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, async_scheduling=False),
                           speculative_config=None)


def _params(defense: dict) -> SamplingParams:
    return SamplingParams(extra_args={"distillgame": defense})


def drive(proc, device: str, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """A scripted run of the processor as vLLM's V1 runner drives it; returns every step's logits and the counters.

    PoE at two strengths, ADS at two eps, an undefended row; prefill and
    decode rows in one step; a finished request whose slot a replayed
    (preempted) request takes; a swap and a one-way move; a row with nothing
    new (a discarded chunked-prefill sample). Each step "samples" the argmax
    of the row. 17 samples of defended rows are released.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = proc.vocab
    poe, ads = {"mode": "poe", "gamma": 0.65}, {"mode": "ads", "lam": 0.1, "eps": 1e-2}
    outputs: dict[int, list[int]] = {i: [] for i in range(4)}
    steps: list[torch.Tensor] = []

    def step(batch: int, grow: set[int] | None = None) -> None:
        logits = torch.randn(batch, vocab, generator=gen).to(device)
        out = proc.apply(logits).cpu()
        steps.append(out)
        for i in range(batch):
            if grow is None or i in grow:
                outputs[i].append(int(out[i].argmax()))

    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (0, _params(poe), [5, 6, 7, 8], outputs[0]),
        (1, _params(ads), [30, 31, 32], outputs[1]),
        (2, _params({"mode": "none"}), [9, 10], outputs[2]),
        (3, _params({"mode": "poe", "gamma": 0.3}), list(range(40, 50)), outputs[3]),
    ]))
    step(4)
    step(4)
    # Request 0 finishes; a preempted request comes back in its place, replaying its outputs.
    outputs[0] = [13, 14]
    proc.update_state(BatchUpdate(batch_size=4, removed=[0], moved=[], added=[
        (0, _params({"mode": "ads", "lam": 0.2, "eps": 3e-3}), [11, 12], outputs[0])]))
    step(4)
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=[], moved=[(1, 3, MoveDirectionality.SWAP)]))
    outputs[1], outputs[3] = outputs[3], outputs[1]
    step(4, grow={0, 2, 3})  # row 1's sample is discarded: next step it has nothing new
    step(4)
    # Row 3 moves over row 2 (the undefended row leaves).
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[],
                                  moved=[(3, 2, MoveDirectionality.UNIDIRECTIONAL)]))
    outputs[2] = outputs[3]
    step(3)
    proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1, 2], added=[], moved=[]))
    return steps, proc.fidelity()


# --- the staging buffer ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_staging_moves_host_values_in_one_copy_and_grows_without_touching_earlier_ones(device):
    stage = Staging(device, capacity=64)
    assert stage.pin == (device == "cuda")
    stage.begin()
    ids, lengths = stage.to_device([[1, 2, 3], [4, 5, 6]], [7, 8])
    (gamma,) = stage.to_device([0.3, 0.65], dtype=torch.float32)
    # More than the buffer holds: a bigger one takes over, earlier tensors keep their values.
    (big,) = stage.to_device(list(range(100)))
    assert ids.device.type == device and ids.dtype == torch.long and ids.shape == (2, 3)
    assert to_host(ids) == [[1, 2, 3], [4, 5, 6]] and to_host(lengths) == [7, 8]
    assert gamma.dtype == torch.float32 and torch.equal(gamma.cpu(), torch.tensor([0.3, 0.65]))
    assert to_host(big) == list(range(100)) and stage.memory_bytes() >= 800
    stage.begin()
    (empty, again) = stage.to_device([], [9])
    assert empty.numel() == 0 and to_host(again) == [9]


def test_the_audit_counts_reads_and_unstaged_builds_and_exempts_setup():
    audit = SyncAudit("cpu")
    x = torch.arange(6)
    with audit.guard(step=True):
        x.max().item()
        x[x > 2]
        torch.tensor([1, 2])
        with audit.exempt():
            x.tolist()
        Staging("cpu").to_device([1, 2])
    report = audit.report()
    assert report["steps"] == 1 and report["host_reads"] == 2 and report["host_builds"] == 1
    assert report["by_call"] == {"item": 1, "__getitem__": 1, "tensor": 1}
    assert report["staged_copies"] == 1 and report["exempted_setups"] == 1


# --- the processor on a plain config -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ads_method", ["jvp", "fd"])
def test_processor_steps_read_nothing_back_from_the_device(tiny_pair, tiny_grads, device, ads_method):
    teacher, proxy = tiny_pair
    section = {"proxy": str(proxy), "ads_grad": str(tiny_grads["proxy"]), "ads_method": ads_method,
               "sync_audit": True}
    proc = DefenseLogitsProcessor(plain_config(teacher, section), torch.device(device), device == "cuda")
    steps, fidelity = drive(proc, device)
    report = proc.sync_audit()
    print(f"host syncs: processor on {device}, ADS by {ads_method}: {report}")
    assert report["steps"] == len(steps) == 6
    assert report["host_reads"] == 0 and report["host_builds"] == 0, report["by_call"]
    # The processor's two copies per step, and at least one per runner forward.
    assert report["staged_copies"] >= 3 * report["steps"]
    assert report["exempted_setups"] >= 1  # the ADS runner(s), built on the first ADS request
    assert all(torch.isfinite(s[:, : proc.vocab]).any(dim=-1).all() for s in steps)
    assert fidelity["poe"]["tokens"] + fidelity["ads"]["tokens"] == 17
    assert fidelity["ads"]["tokens"] > 0 and fidelity["poe"]["kl_sum"] > 0


def test_the_audit_sees_a_host_read_slipped_into_the_step(tiny_pair, tiny_grads, monkeypatch):
    """The zero above is not vacuous: a single ``.item()`` in the runner shows up once per step."""
    teacher, proxy = tiny_pair
    proc = DefenseLogitsProcessor(plain_config(teacher, {"proxy": str(proxy), "sync_audit": True}),
                                  torch.device("cpu"), False)
    step = proc.proxy.step

    def reads_back(slots, tokens):
        out = step(slots, tokens)
        out.max().item()
        return out

    monkeypatch.setattr(proc.proxy, "step", reads_back)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                  added=[(0, _params({"mode": "poe", "gamma": 0.5}), [5, 6, 7], [])]))
    proc.apply(torch.randn(1, proc.vocab))
    proc.apply(torch.randn(1, proc.vocab))
    assert proc.sync_audit()["by_call"] == {"item": 2}


# --- a real engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited_llm(tiny_pair, tiny_grads):
    """A defended engine with the sync audit on and a KV cache small enough to preempt."""
    teacher, proxy = tiny_pair
    llm = build_llm(EngineConfig(
        teacher=str(teacher), proxy=str(proxy), ads_grad=str(tiny_grads["proxy"]), dtype="float32",
        max_model_len=128, max_num_seqs=8, memory_share=0.1, disable_log_stats=False,
        num_gpu_blocks_override=8, engine_overrides={"block_size": 32},
        extra_defense={"sync_audit": True, "initial_cache_len": 8},
    ))
    yield llm
    shutdown(llm)


def test_defended_engine_steps_read_nothing_back_and_still_match_the_oracle(audited_llm, tiny_pair, tiny_grads):
    jobs = [
        Job([5, 6, 7, 8], {"mode": "poe", "gamma": 0.65}, max_tokens=60),
        Job([30, 31], {"mode": "ads", "lam": 0.1, "eps": 1e-2}, max_tokens=56, arrive_at_step=1),
        Job(list(range(40, 60)), {"mode": "poe", "gamma": 0.3}, max_tokens=50, temperature=0.8, seed=3),
        Job([9, 10, 11], {"mode": "none"}, max_tokens=58, arrive_at_step=2),
        Job([100, 101, 102], {"mode": "ads", "lam": 0.2, "eps": 1e-2}, max_tokens=52, temperature=0.8, seed=7,
            arrive_at_step=3),
        Job([200, 201], {"mode": "poe", "gamma": 1.0}, max_tokens=40, arrive_at_step=5),
    ]
    before = num_preemptions(audited_llm)
    run_staggered(audited_llm, jobs)
    assert num_preemptions(audited_llm) > before, "8 blocks of 32 for 6 rows of 60+ tokens must preempt"
    [[report]] = audited_llm.collective_rpc(sync_audit_rpc)
    print(check.sync_line(report))  # quoted by `distillgame check --gpu`
    assert report["steps"] >= 60
    assert report["host_reads"] == 0 and report["host_builds"] == 0, report["by_call"]
    assert report["staged_copies"] >= 3 * report["steps"]
    teacher, proxy = tiny_pair
    ref = ReferenceModels(teacher, proxy, ads_grad=load_file(str(tiny_grads["proxy"])))
    assert worst_error(ref, jobs) < TOL


def test_gpu_check_quotes_the_engine_audit_line(monkeypatch):
    """``distillgame check --gpu`` runs this file and adds the engine's audit line to its summary."""
    report = {"steps": 70, "host_reads": 0, "host_builds": 0, "staged_copies": 301, "sync_debug_mode": "error"}
    stdout = f"..\n{check.sync_line(report)}\n.."
    outcome = check.Outcome("host syncs", True, "8 passed in 80.00s", 80.0)
    monkeypatch.setattr(check, "_pytest", lambda name, files, timeout, extra=(): (outcome, stdout))
    line = check._host_syncs(600.0).line()
    assert line.startswith("PASS  host syncs")
    assert line.endswith("8 passed in 80.00s; 0 host reads, 0 unstaged host builds, 301 staged copies "
                         "in 70 defended steps (sync debug mode: error)")
