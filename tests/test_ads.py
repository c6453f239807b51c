"""ADS: the gradient tool, the sign of the tilt, and the engine against the oracle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distillgame.plugins.ads_grad import load_gradient, read_metadata
from distillgame.plugins.ads_grad import perturbed_copy
from distillgame.plugins.reference import ReferenceModels, load_causal_lm
from engine_helpers import Job, run_staggered, worst_error

TOL = 1e-4


@pytest.fixture(scope="module")
def ads_ref(tiny_pair, tiny_grads) -> ReferenceModels:
    return ReferenceModels(*tiny_pair, ads_grad=load_file(str(tiny_grads["proxy"])))


def test_ads_grad_file_reloads_bit_identically_with_metadata(tiny_pair, tiny_traces, tiny_grads):
    from distillgame.plugins.ads_grad import compute_gradient, read_traces
    from transformers import AutoTokenizer

    _, proxy = tiny_pair
    model = load_causal_lm(proxy)
    again = compute_gradient(model, AutoTokenizer.from_pretrained(proxy), read_traces(tiny_traces))
    saved = load_gradient(tiny_grads["proxy"], model)
    assert set(saved) == {n for n, _ in model.named_parameters()}
    for name, g in again.grad.items():
        assert torch.equal(saved[name], g), name
    meta = read_metadata(tiny_grads["proxy"])
    assert int(meta["num_traces"]) == len(read_traces(tiny_traces))
    assert float(meta["loss_before"]) == pytest.approx(again.loss, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in saved.values())


def test_gradient_from_another_model_is_refused(tiny_pair, tiny_grads):
    teacher, proxy = tiny_pair
    with pytest.raises(ValueError, match="does not match the proxy"):
        load_gradient(tiny_grads["teacher"], load_causal_lm(proxy))
    # Same architecture, other weights: caught by the fingerprint.
    other = perturbed_copy(load_causal_lm(proxy), load_file(str(tiny_grads["proxy"])), 0.5)
    with pytest.raises(ValueError, match="another proxy"):
        load_gradient(tiny_grads["proxy"], other)


def test_ads_lowers_tokens_that_would_teach_the_student(tiny_pair, tiny_grads, ads_ref):
    """Tokens with <g, grad log p_proxy> < 0 (v_grad > 0 in eq. 3: learning them lowers the
    proxy's downstream loss) lose released probability against lam = 0; the opposite gain it."""
    _, proxy_path = tiny_pair
    proxy = load_causal_lm(proxy_path)
    g = load_file(str(tiny_grads["proxy"]))
    prefix = [12, 40, 41, 99, 100, 7]
    logp = torch.log_softmax(proxy(input_ids=torch.tensor([prefix])).logits[0, -1], -1)
    candidates = torch.topk(logp, 20).indices.tolist()
    directional = []
    for tok in candidates:
        proxy.zero_grad()
        logp_t = torch.log_softmax(proxy(input_ids=torch.tensor([prefix])).logits[0, -1], -1)[tok]
        logp_t.backward()
        directional.append(sum(float((p.grad * g[n]).sum()) for n, p in proxy.named_parameters()))
    most_useful = candidates[min(range(len(candidates)), key=directional.__getitem__)]
    least_useful = candidates[max(range(len(candidates)), key=directional.__getitem__)]
    assert min(directional) < 0 < max(directional)

    base = ads_ref.next_token_logprobs(prefix, {"mode": "ads", "lam": 0.0, "eps": 1e-3})
    tilted = ads_ref.next_token_logprobs(prefix, {"mode": "ads", "lam": 0.5, "eps": 1e-3})
    assert tilted[most_useful] < base[most_useful]
    assert tilted[least_useful] > base[least_useful]


def test_mixed_none_poe_ads_batch_matches_reference(tiny_llm, ads_ref):
    jobs = [
        Job([5, 6, 7, 8], {"mode": "ads", "lam": 0.05, "eps": 1e-2}, max_tokens=14),
        Job([30, 31], {"mode": "poe", "gamma": 0.65}, max_tokens=9, arrive_at_step=2),
        Job(list(range(40, 70)), {"mode": "ads", "lam": 0.2, "eps": 3e-3}, max_tokens=6, arrive_at_step=3),
        Job([9, 10, 11], {"mode": "none"}, max_tokens=11),
        Job([100, 101, 102, 103, 104], {"mode": "ads", "lam": 0.1, "eps": 1e-2}, max_tokens=12,
            temperature=0.8, seed=7, arrive_at_step=1),
        Job([200, 201], {"mode": "poe", "gamma": 0.3}, max_tokens=5, temperature=0.8, seed=3),
    ]
    run_staggered(tiny_llm, jobs)
    assert worst_error(ads_ref, jobs) < TOL
    ads_jobs = [j for j in jobs if j.defense["mode"] == "ads"]
    assert worst_error(ads_ref, ads_jobs, defense_override={"mode": "none"}) > 1e-3


def test_lam_zero_reproduces_undefended_logprobs(tiny_llm):
    prompt = [50, 51, 52, 53]
    plain = Job(prompt, {"mode": "none"}, max_tokens=8)
    zero = Job(prompt, {"mode": "ads", "lam": 0.0, "eps": 1e-2}, max_tokens=8)
    run_staggered(tiny_llm, [plain, zero])
    assert zero.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(zero.logprobs, plain.logprobs)) < 1e-5


def test_perturbed_proxies_resolve_the_eps_step_even_for_a_bf16_proxy(tiny_pair, tiny_grads):
    """(lp(theta+eps g) - lp(theta-eps g)) / 2 eps must approximate <g, grad log p>, for a bf16 proxy too.

    The copies are float32 whatever the proxy's dtype; kept in bf16 the eps step
    is rounded away and the difference is noise (checked here as the failure mode).
    """
    _, proxy = tiny_pair
    grad = load_file(str(tiny_grads["proxy"]))
    base = load_causal_lm(proxy, torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 8, 99, 23]])

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, -1].double(), dim=-1)

    # Directional derivative of the bf16 proxy's own weights, in float64 (some
    # of the model's internals stay float32, so h cannot be tiny).
    h = 1e-4
    exact = (logprobs(perturbed_copy(base, grad, h, torch.float64))
             - logprobs(perturbed_copy(base, grad, -h, torch.float64))) / (2 * h)
    eps = 1e-3
    ours = (logprobs(perturbed_copy(base, grad, eps)) - logprobs(perturbed_copy(base, grad, -eps))) / (2 * eps)
    in_bf16 = (logprobs(perturbed_copy(base, grad, eps, torch.bfloat16))
               - logprobs(perturbed_copy(base, grad, -eps, torch.bfloat16))) / (2 * eps)
    rel = lambda est: ((est - exact).norm() / exact.norm()).item()  # noqa: E731
    print(f"relative error: float32 copies {rel(ours):.2e}, bf16 copies {rel(in_bf16):.2e}")
    assert rel(ours) < 1e-2
    assert rel(in_bf16) > 1.0
