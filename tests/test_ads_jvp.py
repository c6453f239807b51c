"""Forward-mode ADS (JvpProxyRunner) against float64 autodiff of the same proxy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distillgame.plugins.ads_jvp import JvpProxyRunner, unsupported_reason
from distillgame.plugins.reference import ReferenceModels
from tiny_models import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def grad(tiny_grads) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_grads["proxy"]))


def _rel(est: torch.Tensor, exact: torch.Tensor) -> float:
    return ((est.double() - exact).norm() / exact.norm()).item()


def test_forward_mode_matches_float64_autodiff_across_prefill_decode_and_slots(tiny_pair, grad):
    teacher, proxy = tiny_pair
    ref = ReferenceModels(teacher, proxy, ads_grad=grad)
    # Capacity 4 forces the slot cache to grow; slots out of order take the gathered
    # path, slots in order the view path.
    runner = JvpProxyRunner(ref.proxy, grad, num_slots=4, device=torch.device("cpu"), initial_capacity=4)
    seqs = {2: [5, 6, 7, 8, 9, 10, 11], 0: [30, 31, 32], 1: [70, 71, 72, 73, 74]}
    steps = [
        ([2, 0], {2: seqs[2], 0: seqs[0]}),  # two prefills of different lengths
        ([0, 1, 2], {0: [40], 1: seqs[1], 2: [41]}),  # decode rows and a new prefill in one step
        ([0, 1], {0: [42], 1: [43]}),  # consecutive slots
        ([1, 0], {1: [], 0: [44]}),  # a row with nothing new reuses its last answer
    ]
    fed = {s: [] for s in seqs}
    worst = 0.0
    for slots, new in steps:
        out = runner.step(slots, [new[s] for s in slots])
        for row, slot in enumerate(slots):
            fed[slot] += new[slot]
            exact = ref.directional(fed[slot])
            worst = max(worst, _rel(out[row], exact))
            assert out[row].abs().max() > 1e-3  # not trivially zero
    assert worst < 1e-5, worst


def test_tilt_matches_the_finite_difference_it_replaces(tiny_pair, grad):
    """lam * D equals lam/(2 eps) * (lp(theta+eps g) - lp(theta-eps g)) up to the O(eps^2) term."""
    teacher, proxy = tiny_pair
    jvp_ref = ReferenceModels(teacher, proxy, ads_grad=grad, ads_method="jvp")
    fd_ref = ReferenceModels(teacher, proxy, ads_grad=grad, ads_method="fd")
    prefix = [12, 40, 41, 99, 100, 7]
    defense = {"mode": "ads", "lam": 0.3, "eps": 1e-3}
    a, b = jvp_ref.next_token_logprobs(prefix, defense), fd_ref.next_token_logprobs(prefix, defense)
    none = jvp_ref.next_token_logprobs(prefix, {"mode": "none"})
    assert (a - b).abs().max() < 1e-3 * (a - none).abs().max()
    assert (a - none).abs().max() > 1e-2


def test_bf16_proxy_keeps_the_tangent_where_bf16_copies_lose_it(tiny_pair, grad):
    teacher, proxy = tiny_pair
    ref = ReferenceModels(teacher, proxy, ads_grad=grad, dtype=torch.bfloat16)
    runner = JvpProxyRunner(ref.proxy, grad, num_slots=1, device=torch.device("cpu"))
    ids = [5, 17, 42, 8, 99, 23]
    rel = _rel(runner.step([0], [ids])[0], ref.directional(ids))
    print(f"bf16 forward mode: relative error {rel:.2e}")
    # bf16 copies theta +- eps g give errors above 1 (tests/test_ads.py).
    assert rel < 5e-2


def test_unsupported_proxy_is_refused_with_the_reason(tmp_path):
    path = make_llama(tmp_path / "gelu", make_tokenizer(), layers=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert unsupported_reason(model) is None
    model.config.hidden_act = "gelu"
    assert "hidden_act" in unsupported_reason(model)
    with pytest.raises(ValueError, match="does not support this proxy: hidden_act"):
        JvpProxyRunner(model, {}, num_slots=1, device=torch.device("cpu"))


def test_sequence_gives_every_position_of_a_teacher_forced_trace(tiny_pair, grad):
    teacher, proxy = tiny_pair
    ref = ReferenceModels(teacher, proxy, ads_grad=grad)
    runner = JvpProxyRunner(ref.proxy, grad, num_slots=1, device=torch.device("cpu"), initial_capacity=4)
    ids = [5, 9, 13, 17, 21, 25, 29, 33]
    rows = runner.sequence(ids, start=5)
    assert rows.shape[0] == 3
    for i, k in enumerate(range(5, 8)):
        assert _rel(rows[i], ref.directional(ids[:k])) < 1e-5
