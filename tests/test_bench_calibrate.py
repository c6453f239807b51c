"""Budget calibration: bisection, the KL it measures (held to the float64 oracle), the policy write."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from distillgame.bench.calibrate import bisect, mean_kl, position_logprobs, prompt_kls, run_calibrate, write_tier
from distillgame.server.policy import load_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "server" / "policy.example.toml"


def test_bisect_finds_the_root_and_grows_the_bracket():
    x, fx, hist = bisect(lambda v: v ** 2, 9.0, 0.0, 1.0, tol=1e-4, grow=True)
    assert x == pytest.approx(3.0, rel=1e-4) and fx == pytest.approx(9.0, rel=1e-4)
    assert hist[1][0] == 2.0  # the bracket doubled until it held the target
    with pytest.raises(ValueError):
        bisect(lambda v: v, 5.0, 0.0, 1.0)


def test_write_tier_keeps_the_rest_of_the_policy(tmp_path):
    policy = tmp_path / "policy.toml"
    shutil.copy(EXAMPLE, policy)
    write_tier(policy, "standard", {"mode": "poe", "gamma": 0.123})
    write_tier(policy, "calibrated", {"mode": "ads", "lam": 0.02, "eps": 1e-4})
    loaded = load_policy(policy)
    assert loaded.tiers["standard"].defense.gamma == pytest.approx(0.123)
    assert loaded.tiers["standard"].max_tokens == 1024  # untouched limits
    assert loaded.tiers["free"].defense.gamma == pytest.approx(0.8)
    assert loaded.tiers["calibrated"].defense.lam == pytest.approx(0.02)


@pytest.fixture(scope="module")
def ref():
    from distillgame import models
    from distillgame.plugins.reference import ReferenceModels

    torch.set_num_threads(1)
    return ReferenceModels(models.resolve(None, "teacher"), models.resolve(None, "proxy"))


def test_position_kl_matches_the_oracle(ref):
    ids = list(range(1000, 1012))
    lp = position_logprobs(ref, [(ids, 8)], "poe")
    assert lp.teacher.shape[0] == 4
    assert mean_kl(lp, "poe", 0.0) == pytest.approx(0.0, abs=1e-9)
    gamma = 0.3
    # KL(released || teacher) from the full-recompute oracle, position by position
    kls = []
    for k in range(8, 12):
        released = ref.next_token_logprobs(ids[:k], {"mode": "poe", "gamma": gamma})
        teacher = ref.next_token_logprobs(ids[:k], {"mode": "none"})
        v = lp.teacher.shape[1]
        kls.append(float((released.exp()[:v] * (released[:v] - teacher[:v])).sum()))
    assert mean_kl(lp, "poe", gamma) == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert mean_kl(lp, "poe", 0.6) > mean_kl(lp, "poe", gamma) > 0


@pytest.fixture(scope="module")
def ads_ref(ref):
    from distillgame.plugins.reference import ReferenceModels

    g = torch.Generator().manual_seed(0)
    grad = {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in ref.proxy.named_parameters()}
    return ReferenceModels(ref.teacher_path, ref.proxy_path, ads_grad=grad)


def test_ads_position_kl_matches_the_oracle(ads_ref):
    ids = list(range(1000, 1012))
    lp = position_logprobs(ads_ref, [(ids, 8)], "ads")
    assert lp.directional.shape == lp.teacher.shape and lp.proxy is None
    assert mean_kl(lp, "ads", 0.0) == pytest.approx(0.0, abs=1e-9)
    lam = 2.0
    kls = []
    for k in range(8, 12):
        released = ads_ref.next_token_logprobs(ids[:k], {"mode": "ads", "lam": lam, "eps": 1e-4})
        teacher = ads_ref.next_token_logprobs(ids[:k], {"mode": "none"})
        v = lp.teacher.shape[1]
        kls.append(float((released.exp()[:v] * (released[:v] - teacher[:v])).sum()))
    assert sum(kls) > 1e-3
    assert mean_kl(lp, "ads", lam) == pytest.approx(sum(kls) / len(kls), rel=1e-4)


def test_float16_storage_moves_the_kl_by_under_one_percent(ref, ads_ref):
    ids = list(range(3000, 3040))
    for mode, r, value in (("poe", ref, 0.3), ("ads", ads_ref, 2.0)):
        wide = mean_kl(position_logprobs(r, [(ids, 10)], mode), mode, value)
        half_lp = position_logprobs(r, [(ids, 10)], mode, torch.float16)
        assert half_lp.teacher.dtype == torch.float16
        half = mean_kl(half_lp, mode, value)
        print(f"{mode}: KL {wide:.6f} (float32) vs {half:.6f} (float16)")
        assert abs(half - wide) < 1e-2 * wide


def test_prompt_kls_split_the_positions_by_trace(ref):
    a, b = list(range(1000, 1010)), list(range(2000, 2010))
    lp = position_logprobs(ref, [(a, 7), (b, 7)], "poe")  # 3 positions per trace
    per = prompt_kls(lp, "poe", 0.4, tokens=3)
    alone = [mean_kl(position_logprobs(ref, [(x, 7)], "poe"), "poe", 0.4) for x in (a, b)]
    assert per.tolist() == pytest.approx(alone, rel=1e-6)
    assert abs(float(per[0]) - float(per[1])) > 1e-3 * float(per.mean())  # two prompts, two values
    assert float(per.mean()) == pytest.approx(mean_kl(lp, "poe", 0.4), rel=1e-9)


def test_calibrate_end_to_end_writes_the_tier(tmp_path):
    policy = tmp_path / "policy.toml"
    shutil.copy(EXAMPLE, policy)
    args = argparse.Namespace(mode="poe", target_kl=0.3, policy=policy, tier="standard", teacher=None, proxy=None,
                              ads_grad=None, calib=3, holdout=2, tokens=6, tol=0.005, out=tmp_path / "res")
    result = run_calibrate(args)
    assert result["kl_calibration"] == pytest.approx(0.3, rel=0.005)
    gamma = load_policy(policy).tiers["standard"].defense.gamma
    assert gamma == pytest.approx(result["gamma"], abs=1e-6) and 0 < gamma < 0.999
    assert (tmp_path / "res" / "calibrate_poe.json").exists()
