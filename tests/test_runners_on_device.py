"""The proxy runners on every device this machine has: equal to float64 recompute, and no host waits.

The runners (:class:`ProxyRunner` for PoE, :class:`JvpProxyRunner` for ADS)
are the defense's own device code, and they need only torch and transformers.
So this file runs wherever they do, including a GPU machine that has no
vLLM: ``distillgame check --gpu`` runs it there. On CUDA, each step runs
under the sync audit, which sets ``torch.cuda.set_sync_debug_mode("error")``:
one synchronizing call in a step fails the test.

One scripted schedule drives both runners: prefills of different lengths,
decode rows beside a new prefill, consecutive and scattered slots, a row with
nothing new, a slot handed to a new request, and cache growth (the caches
start at 4 positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillgame.plugins.ads_jvp import JvpProxyRunner
from distillgame.plugins.proxy_runner import ProxyRunner
from distillgame.plugins.reference import ReferenceModels, load_causal_lm
from distillgame.plugins.transfers import SyncAudit
from tiny_models import make_llama, make_tokenizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = 1e-4

# (slots, new tokens per slot); "reset" hands the slot to a new request first.
SCHEDULE = [
    ([2, 0], {2: [5, 6, 7, 8, 9, 10, 11], 0: [30, 31, 32]}, ()),
    ([0, 1, 2], {0: [40], 1: [70, 71, 72, 73, 74], 2: [41]}, ()),
    ([0, 1], {0: [42], 1: [43]}, ()),
    ([1, 0], {1: [], 0: [44]}, ()),
    ([2, 1], {2: [100, 101, 102], 1: [45]}, (2,)),
    ([3, 2, 0, 1], {3: [7, 8], 2: [46], 0: [47], 1: [48]}, ()),
]


@pytest.fixture(scope="module")
def proxies(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """The tiny proxy (2 query heads on 1 KV head) and one with 3 KV heads of 2 query heads each.

    Several KV heads lay the attention's output out differently on CUDA than one does
    (a view of it failed there), so both shapes run.
    """
    gqa = make_llama(tmp_path_factory.mktemp("gqa") / "proxy", make_tokenizer(), layers=2, hidden=384, heads=6,
                     kv_heads=3, seed=2)
    return {"kv1": tiny_pair[1], "kv3": gqa}


def direction(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed direction ``g`` in parameter space (ADS's gradient; any direction defines the derivative)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.05 * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def run_schedule(runner, device: str) -> tuple[list[list[tuple[list[int], torch.Tensor]]], dict]:
    """Drive ``runner`` through SCHEDULE under the sync audit; per step, each row's prefix and answer (on the CPU)."""
    audit = SyncAudit(device)
    fed: dict[int, list[int]] = {}
    answers = []
    for slots, new, resets in SCHEDULE:
        for slot in resets:
            runner.reset(slot)
            fed[slot] = []
        with audit.guard(step=True):
            out = runner.step(slots, [new[s] for s in slots])
        rows = []
        for row, slot in enumerate(slots):
            fed[slot] = fed.get(slot, []) + new[slot]
            rows.append((list(fed[slot]), out[row]))
        answers.append(rows)
    if device == "cuda":
        torch.cuda.synchronize()
    return [[(prefix, out.cpu()) for prefix, out in rows] for rows in answers], audit.report()


def _assert_no_host_waits(report: dict, device: str) -> None:
    print(f"host syncs: proxy runner on {device}: {report}")
    assert report["steps"] == len(SCHEDULE)
    assert report["host_reads"] == 0 and report["host_builds"] == 0, report["by_call"]
    assert report["staged_copies"] >= len(SCHEDULE)  # every step's inputs went through the staging buffer
    assert report["sync_debug_mode"] == ("error" if device == "cuda" else None)


@pytest.mark.parametrize("shape", ["kv1", "kv3"])
@pytest.mark.parametrize("device", DEVICES)
def test_poe_runner_matches_float64_recompute_without_host_waits(proxies, device, shape):
    proxy = proxies[shape]
    exact = load_causal_lm(proxy, torch.float64)
    runner = ProxyRunner(load_causal_lm(proxy).to(device), num_slots=4, device=torch.device(device),
                         initial_capacity=4)
    answers, report = run_schedule(runner, device)
    _assert_no_host_waits(report, device)
    worst = 0.0
    for rows in answers:
        for prefix, out in rows:
            with torch.no_grad():
                want = torch.log_softmax(exact(input_ids=torch.tensor([prefix])).logits[0, -1], dim=-1)
            worst = max(worst, (out.double() - want).abs().max().item())
    print(f"PoE runner on {device}, {shape}: worst |log p - float64| = {worst:.2e}")
    assert worst < TOL
    assert runner.cache.capacity > 4  # the schedule outgrew the first allocation


@pytest.mark.parametrize("shape", ["kv1", "kv3"])
@pytest.mark.parametrize("device", DEVICES)
def test_ads_runner_matches_float64_forward_mode_without_host_waits(proxies, device, shape):
    proxy = proxies[shape]
    ref = ReferenceModels(proxy, proxy, ads_grad=direction(load_causal_lm(proxy)))
    runner = JvpProxyRunner(load_causal_lm(proxy).to(device), ref.ads_grad, num_slots=4,
                            device=torch.device(device), initial_capacity=4)
    answers, report = run_schedule(runner, device)
    _assert_no_host_waits(report, device)
    worst = 0.0
    for rows in answers:
        for prefix, out in rows:
            want = ref.directional(prefix)
            assert out.abs().max() > 1e-3  # a real tilt, not zeros
            worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
    print(f"ADS runner on {device}, {shape}: worst relative error against float64 = {worst:.2e}")
    assert worst < 3e-5


@pytest.mark.parametrize("shape", ["kv1", "kv3"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_runners_stay_close_to_float64(proxies, device, shape):
    """The dtype a GPU serves in: bf16 weights, answers in float32."""
    proxy = proxies[shape]
    ref = ReferenceModels(proxy, proxy, ads_grad=direction(load_causal_lm(proxy)))
    exact = load_causal_lm(proxy, torch.float64)
    model = load_causal_lm(proxy, torch.bfloat16).to(device)
    poe = ProxyRunner(model, num_slots=4, device=torch.device(device), initial_capacity=4)
    ads = JvpProxyRunner(model, ref.ads_grad, num_slots=4, device=torch.device(device), initial_capacity=4)
    (poe_answers, poe_report), (ads_answers, ads_report) = run_schedule(poe, device), run_schedule(ads, device)
    _assert_no_host_waits(poe_report, device)
    _assert_no_host_waits(ads_report, device)
    poe_worst = ads_worst = 0.0
    for poe_rows, ads_rows in zip(poe_answers, ads_answers):
        for (prefix, lp), (_, deriv) in zip(poe_rows, ads_rows):
            with torch.no_grad():
                want = torch.log_softmax(exact(input_ids=torch.tensor([prefix])).logits[0, -1], dim=-1)
            probs = want.exp()
            # Error in nats where the mass is: sum_t p(t) |log p_bf16(t) - log p(t)|.
            poe_worst = max(poe_worst, (probs * (lp.double() - want).abs()).sum().item())
            d = ref.directional(prefix)
            ads_worst = max(ads_worst, ((deriv.double() - d).norm() / d.norm()).item())
    print(f"bf16 on {device}, {shape}: PoE {poe_worst:.2e} nats, ADS relative {ads_worst:.2e}")
    # bf16 rounding: a few hundredths here (up to 0.04 on CPUs); a wrong slot, position or
    # tangent is off by whole nats or by 100%.
    assert poe_worst < 0.1
    assert ads_worst < 0.1


def test_runner_step_bench_writes_its_table(tiny_pair, tmp_path):
    """``bench.runner_step`` on this machine's CPU, at toy size: every mode timed, ratios from the same run."""
    from distillgame.bench import runner_step

    teacher, proxy = tiny_pair
    out = tmp_path / "bench"
    assert runner_step.main(["--device", "cpu", "--dtype", "float32", "--proxy", str(proxy), "--teacher",
                             str(teacher), "--batches", "1", "3", "--context", "16", "--steps", "2",
                             "--rounds", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads((out / "runner_step.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for row, (batch, times) in zip(report["rows"], report["seconds"].items()):
        assert set(times) == {"poe", "ads", "teacher_eager"}
        assert all(len(t["wall"]) == 4 and min(t["wall"]) > 0 for t in times.values())
        assert row["poe_over_teacher"] == pytest.approx(row["poe_ms"] / row["teacher_eager_ms"])
        assert 0 < row["poe_host_share"] <= 1.0
    assert "| 3 |" in (out / "runner_step.md").read_text()


def test_the_gpu_check_refuses_a_machine_without_cuda():
    """Run as a module (how a GPU machine without the server's dependencies runs it): exit 2, saying why."""
    # No visible GPU, also on a machine that has one, so the refusal runs everywhere.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "distillgame.check", "--gpu", "--runners-only"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr
