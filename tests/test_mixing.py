"""The per-row mixing arithmetic against direct float64 formulas, -inf entries included,
and the two forms a request's defense arrives in (nested and flat ``extra_args``)."""

from __future__ import annotations

import math

import pytest
import torch

from distillgame.plugins.mixing import (
    all_finite,
    argmax_rows,
    Defense,
    ads_tilt,
    flat_defense_args,
    kl_and_agreement,
    kl_and_agreement_into,
    log_softmax_into,
    parse_defense,
    poe_mix,
    poe_mix_into,
    Workspace,
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


# ------------------------------------------------------------ the engine's in-place forms


def _logits(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 4


def test_log_softmax_into_is_log_softmax_with_masked_entries():
    x = _logits(5, 3000, 0)
    x[1, 7] = x[3, :100] = -math.inf
    out, scratch = torch.empty_like(x), torch.empty_like(x)
    log_softmax_into(x, out, scratch)
    want = torch.log_softmax(x.double(), dim=-1)
    assert torch.equal(torch.isneginf(out), torch.isneginf(want))
    assert (out - want).abs().nan_to_num(0.0).max() < 2e-6


@pytest.mark.parametrize("normalized", [False, True])
def test_poe_mix_into_is_poe_mix_with_the_teachers_masked_entries_kept(normalized):
    raw_t, raw_p = _logits(4, 3000, 1), _logits(4, 3000, 2)
    raw_t[0, 5] = raw_t[2, 9] = raw_t[3, 11] = -math.inf
    teacher = torch.log_softmax(raw_t, dim=-1)
    proxy_lp = torch.log_softmax(raw_p, dim=-1)
    gammas = [0.0, 0.3, 0.65, 1.0]
    gamma = torch.tensor(gammas)[:, None]
    want = poe_mix(teacher.double(), proxy_lp.double(), gamma.double())
    want.masked_fill_(torch.isneginf(teacher), -math.inf)
    out, scratch = torch.empty_like(teacher), torch.empty_like(teacher)
    poe_mix_into(teacher, proxy_lp if normalized else raw_p, gamma, out, scratch,
                 proxy_normalized=normalized, gamma_max=max(gammas))
    # Equal up to one number per row (the proxy's normalization): what sampling and logprobs see is equal.
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)) and not torch.isnan(out).any()
    got = torch.log_softmax(out.double(), dim=-1)
    assert (got - torch.log_softmax(want, dim=-1)).abs().nan_to_num(0.0).max() < 2e-5
    # The logits themselves are poe_mix's, not just their softmax (processed_logits mode returns them).
    assert (out - want).abs().nan_to_num(0.0).max() < 2e-5
    # Below gamma 1 the teacher's -inf needs no mask; a gamma of 1 without one would leave NaN.
    poe_mix_into(teacher, raw_p, gamma, out, scratch, proxy_normalized=False, gamma_max=0.99)
    assert torch.isnan(out[3, 11]) and torch.isneginf(out[:3][torch.isneginf(teacher[:3])]).all()


@pytest.mark.parametrize("cols", [700, 1024, 3000, 4096, 49152 + 5])
def test_argmax_rows_is_argmax_first_maximum_on_ties(cols):
    x = _logits(6, cols, cols)
    x[0] = x[0].round()  # many ties, as in bfloat16 logits
    x[1] = 0.0  # all tied: index 0
    x[2, -1] = 100.0  # the maximum in the last, partial block
    x[3, :] = -math.inf
    x[3, cols // 2] = x[3, cols - 1] = 1.0  # two maxima among masked entries
    x[4] = x[4].to(torch.bfloat16).float()
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x)[1] == 0 and argmax_rows(x)[2] == cols - 1 and argmax_rows(x)[3] == cols // 2


def test_kl_and_agreement_into_matches_the_definition():
    raw_t, raw_p = _logits(4, 3000, 3), _logits(4, 3000, 4)
    raw_t[0, 5] = raw_t[2, 9] = raw_t[3, 11] = -math.inf
    teacher = torch.log_softmax(raw_t, dim=-1)
    released = poe_mix(teacher, torch.log_softmax(raw_p, dim=-1), torch.tensor([[0.0], [0.3], [0.65], [1.0]]))
    released[:3].masked_fill_(torch.isneginf(teacher[:3]), -math.inf)  # row 3: mass where the teacher has none
    want_kl, want_agree = kl_and_agreement(released.double(), teacher.double())
    kl, agree = kl_and_agreement_into(released, teacher, torch.empty_like(teacher), torch.empty_like(teacher))
    assert kl[3] == math.inf and want_kl[3] == math.inf
    assert (kl[:3].double() - want_kl[:3]).abs().max() < 1e-4 and kl[1] > 0.1
    assert kl[0] < 1e-5
    assert agree.tolist() == want_agree.tolist()


def test_workspace_reuses_its_buffers_and_grows_by_powers_of_two():
    ws = Workspace(vocab=10, device="cpu")
    first = ws.get(3)
    assert [tuple(b.shape) for b in first] == [(3, 10)] * 4 and ws.rows == 4
    assert [b.data_ptr() for b in ws.get(4)] == [b.data_ptr() for b in first]  # no new memory within capacity
    assert len({b.data_ptr() for b in first}) == 4  # four separate buffers
    grown = ws.get(5)
    assert ws.rows == 8 and tuple(grown[0].shape) == (5, 10)
