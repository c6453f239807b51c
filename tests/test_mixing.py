"""The per-row mixing arithmetic against direct float64 formulas, -inf entries included,
and the two forms a request's defense arrives in (nested and flat ``extra_args``)."""

from __future__ import annotations

import math

import pytest
import torch

from distillgame.plugins.mixing import (
    all_finite,
    Defense,
    ads_tilt,
    flat_defense_args,
    kl_and_agreement,
    parse_defense,
    poe_mix,
)


def _rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(4, 50, generator=g) * 3, dim=-1)
    proxy = torch.log_softmax(torch.randn(4, 50, generator=g) * 3, dim=-1)
    # Tokens ruled out by one side, by the other, and by both.
    teacher[0, 3] = proxy[1, 4] = -math.inf
    teacher[2, 5] = proxy[2, 5] = -math.inf
    return teacher, proxy


def _direct_poe(t: float, p: float, gamma: float) -> float:
    a = 0.0 if gamma == 1.0 else (1 - gamma) * t
    b = 0.0 if gamma == 0.0 else gamma * p
    return a + b


def test_poe_mix_matches_the_formula_and_zero_weight_hides_minus_inf():
    teacher, proxy = _rows()
    gammas = torch.tensor([[0.0], [0.3], [0.65], [1.0]])
    mixed = poe_mix(teacher, proxy, gammas)
    for r in range(4):
        for c in range(50):
            want = _direct_poe(teacher[r, c].item(), proxy[r, c].item(), gammas[r, 0].item())
            got = mixed[r, c].item()
            assert (got == want) if math.isinf(want) else abs(got - want) < 1e-5, (r, c, got, want)
    assert not torch.isnan(mixed).any()
    # gamma 0 is the teacher, gamma 1 the proxy, even where the other side is -inf.
    assert torch.equal(mixed[0], teacher[0]) and mixed[0, 3] == -math.inf
    assert torch.equal(mixed[3], proxy[3])


def test_kl_and_agreement_match_a_direct_sum():
    teacher, proxy = _rows(1)
    released = poe_mix(teacher, proxy, torch.tensor([[0.0], [0.3], [0.65], [1.0]]))
    kl, agree = kl_and_agreement(released, teacher)
    q = torch.softmax(released.double(), dim=-1)
    for r in range(4):
        terms = [q[r, c].item() * (math.log(q[r, c].item()) - teacher[r, c].item())
                 for c in range(50) if q[r, c].item() > 0]
        want = sum(terms)
        assert (kl[r].item() == want) if math.isinf(want) else abs(kl[r].item() - want) < 1e-4, (r, kl[r], want)
    assert kl[0].item() < 1e-5  # gamma 0 releases the teacher itself (float32 round-off only)
    # Every -inf of the teacher sits in a row whose release rules the token out too.
    assert torch.isfinite(kl).all() and (kl[1:] > 1e-3).all()
    assert agree.tolist() == [bool(released[r].argmax() == teacher[r].argmax()) for r in range(4)]
    assert agree[0]


def test_kl_is_infinite_when_the_release_puts_mass_where_the_teacher_has_none():
    teacher = torch.log_softmax(torch.tensor([[0.0, 1.0, -math.inf]]), dim=-1)
    released = torch.tensor([[0.0, 1.0, 0.5]])
    kl, _ = kl_and_agreement(released, teacher)
    assert kl.item() == math.inf


@pytest.mark.parametrize("planted", [math.nan, math.inf, -math.inf, (math.inf, -math.inf)])
def test_all_finite_catches_every_non_finite_element_that_isfinite_does(planted):
    values = torch.log_softmax(torch.randn(4, 1000), dim=-1)
    assert bool(all_finite(values)) and bool(all_finite(values[:0]))
    for value, col in zip(planted if isinstance(planted, tuple) else (planted,), (17, 901)):
        values[2, col] = value
    assert not bool(torch.isfinite(values).all())
    assert not bool(all_finite(values)), f"{planted} in one row went unnoticed"
    # Half precision is summed in float32: 4 x 1000 entries of -60000 are finite and stay so.
    assert bool(all_finite(torch.full((4, 1000), -6e4, dtype=torch.float16)))


def test_ads_tilt_is_the_scaled_finite_difference():
    teacher, plus = _rows(2)
    minus = torch.log_softmax(plus * 0.9, dim=-1)
    out = ads_tilt(teacher, plus, minus, torch.tensor([[0.1]]), torch.tensor([[0.05]]))
    finite = torch.isfinite(plus) & torch.isfinite(minus) & torch.isfinite(teacher)
    want = teacher + 1.0 * (plus - minus)
    assert torch.allclose(out[finite], want[finite], atol=1e-6)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("nested", [
    {"mode": "poe", "gamma": 0.65},
    {"mode": "poe", "gamma": 1},
    {"mode": "ads", "lam": 0.1, "eps": 0.05},
    {"mode": "ads", "lam": 0.0},
    {"mode": "none"},
])
def test_flat_vllm_xargs_parse_to_the_same_defense_as_the_nested_form(nested):
    flat = {f"distillgame_{key}": value for key, value in nested.items()}
    want = parse_defense({"distillgame": nested})
    assert parse_defense(flat) == want
    # Other engine arguments beside it are not the defense's business.
    assert parse_defense({**flat, "kv_transfer_params": 1, "session": "x"}) == want
    # What a gateway writes parses back to the defense it was made from.
    assert parse_defense(flat_defense_args(want)) == want


@pytest.mark.parametrize("extra_args, param", [
    ({"distillgame_mode": "poe", "distillgame_gamma": 0.5, "distillgame": {"mode": "none"}}, "distillgame_gamma"),
    ({"distillgame_mode": "none", "distillgame": None}, "distillgame_mode"),
    ({"distillgame_mode": "poe", "distillgame_gamma": 0.5, "distillgame_strength": 2}, "distillgame_strength"),
    ({"distillgame_gama": 0.5}, "distillgame_gama"),
    ({"distillgame_mode": "poe", "distillgame_gamma": 1.5}, "distillgame_gamma"),
    ({"distillgame_mode": "poe", "distillgame_gamma": "0.5"}, "distillgame_gamma"),
    ({"distillgame_mode": "poe"}, "distillgame_gamma"),
    ({"distillgame_gamma": 0.5}, "distillgame_gamma"),  # mode defaults to none, which has no gamma
    ({"distillgame_mode": "ads", "distillgame_lam": -1.0}, "distillgame_lam"),
    ({"distillgame_mode": "ads", "distillgame_lam": 0.1, "distillgame_eps": 0}, "distillgame_eps"),
    ({"distillgame_mode": "strong"}, "distillgame_mode"),
])
def test_bad_flat_defense_is_a_value_error_naming_the_parameter(extra_args, param):
    with pytest.raises(ValueError) as err:
        parse_defense(extra_args)
    # The processor's validate_params reports the first word as the parameter.
    assert str(err.value).split(" ", 1)[0] == param, str(err.value)


def test_extra_args_without_any_defense_key_are_undefended():
    assert parse_defense({}) == Defense()
    assert parse_defense({"distillgamer": 1, "other_distillgame_mode": "poe"}) == Defense()
