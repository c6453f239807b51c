"""The adaptive student's weights, its KL budget, and its passive limit (eta = 0)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distillgame.clients.attack.distill import (
    DistillConfig,
    Example,
    add_lora,
    sequence_logprobs,
    train,
    trainable_params,
)
from distillgame.clients.attack.weights import eta_for_budget, kl_to_uniform, tilt_weights, uniform_weights

VOCAB, PAD = 97, 0


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(cfg)


def random_examples(n: int, seed: int) -> list[Example]:
    """Prompt/completion pairs of varied lengths (so right padding is exercised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        c = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + c,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] * p + ids[p:], id=f"ex{i}"))
    return out


def config(tmp_path: Path, **kw) -> DistillConfig:
    base = dict(
        student="tiny", out=tmp_path, rank=4, lr=1e-2, epochs=2, batch_size=4, grad_accum=2, max_length=32, seed=3
    )
    base.update(kw)
    return DistillConfig(**base)


def lora_student(cfg: DistillConfig) -> torch.nn.Module:
    return add_lora(tiny_llama(), cfg)


def test_kl_of_weights_matches_rho_budget():
    g = torch.Generator().manual_seed(0)
    for B in (2, 6, 24):
        v = torch.randn(B, generator=g, dtype=torch.float64) * 1e3  # eq. 3 values are large and unscaled
        limit = math.log(B)
        for rho in (1e-4, 0.01, 0.1, 0.5 * limit, 0.9 * limit):
            eta = eta_for_budget(v, rho)
            assert eta > 0
            assert abs(kl_to_uniform(tilt_weights(v, eta)) - rho) < 1e-6
    assert eta_for_budget(torch.ones(5), 0.3) == 0.0  # all values equal: no tilt can spend the budget
    assert torch.equal(tilt_weights(torch.randn(7), 0.0), uniform_weights(7))


@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_adaptive_weights_equal_brute_force_per_example_backward(norm, tmp_path):
    cfg = config(tmp_path, mode="adaptive", rho=0.3, epochs=1, value_norm=norm)
    model = lora_student(cfg)
    train_set, val_set = random_examples(16, seed=1), random_examples(5, seed=2)
    params = trainable_params(model)
    checked = []

    def brute_force(step, micro, batch, w, v):
        if step != 1:  # after one update the LoRA B matrices are non-zero: every parameter matters
            return
        # L_val and each log p(y|x): unpadded, one backward per example.
        g_val = {n: torch.zeros_like(p) for n, p in params.items()}
        for e in val_set:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            logp, count = sequence_logprobs(model(input_ids=ids).logits, labels)
            loss = -(logp / count).sum() / len(val_set)
            for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                g_val[n] += g
        v_ref = []
        for i in range(batch.input_ids.shape[0]):
            L = int(batch.attention_mask[i].sum())
            logp, count = sequence_logprobs(model(input_ids=batch.input_ids[i : i + 1, :L]).logits, batch.labels[i : i + 1, :L])
            target = logp.sum() / count.sum() if norm == "mean" else logp.sum()
            grads = torch.autograd.grad(target, list(params.values()))
            v_ref.append(-sum(float((g.double() * g_val[n].double()).sum()) for (n, _), g in zip(params.items(), grads)))
        v_ref = torch.tensor(v_ref, dtype=torch.float64)
        eta = eta_for_budget(v_ref, cfg.rho)
        w_ref = tilt_weights(v_ref, eta)
        assert float(v_ref.std()) > 0
        assert torch.allclose(v, v_ref, rtol=1e-4, atol=1e-6)
        assert (w - w_ref).abs().max() < 1e-5
        assert abs(kl_to_uniform(w) - cfg.rho) < 1e-6
        assert (w - uniform_weights(len(w))).abs().max() > 1e-3  # the tilt is not trivially uniform
        checked.append(micro)

    history = train(model, train_set, val_set, cfg, PAD, on_step=brute_force)
    assert checked == [0, 1]
    assert all(abs(kl - cfg.rho) < 1e-6 for row in history for kl in row["kl"])


def test_eta_zero_reproduces_passive_run_bit_for_bit(tmp_path):
    train_set, val_set = random_examples(20, seed=4), random_examples(4, seed=5)
    finals = {}
    for name, kw in {
        "passive": dict(mode="passive"),
        "adaptive_eta0": dict(mode="adaptive", eta=0.0),
        "adaptive": dict(mode="adaptive", eta=None, rho=0.2),
    }.items():
        cfg = config(tmp_path / name, **kw)
        model = lora_student(cfg)
        history = train(model, train_set, val_set, cfg, PAD)
        assert history[-1]["loss"] < history[0]["loss"]  # the student learns from the traces
        finals[name] = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    assert finals["passive"].keys() == finals["adaptive_eta0"].keys()
    for n in finals["passive"]:
        assert torch.equal(finals["passive"][n], finals["adaptive_eta0"][n]), n
    # The control is sensitive: a real tilt moves the weights.
    assert any(not torch.equal(finals["passive"][n], finals["adaptive"][n]) for n in finals["passive"])


def test_placebo_shuffles_the_values_and_keeps_the_weight_spread(tmp_path):
    """The placebo control's weights are the real weights in a shuffled order, nothing else."""
    train_set, val_set = random_examples(24, seed=6), random_examples(4, seed=7)
    seen = {}
    for placebo in (False, True):
        cfg = config(tmp_path / str(placebo), mode="adaptive", rho=0.2, max_steps=1, placebo=placebo)
        rows = []
        train(lora_student(cfg), train_set, val_set, cfg, PAD, on_step=lambda s, m, b, w, v: rows.append((v, w)))
        seen[placebo] = rows
    moved = 0
    for (v, w), (v_p, w_p) in zip(seen[False], seen[True]):
        # Step 0 starts from the same weights, so the values are the same multiset...
        assert torch.allclose(v.sort().values, v_p.sort().values, rtol=1e-6, atol=1e-9)
        assert torch.allclose(w.sort().values, w_p.sort().values, atol=1e-9)
        assert abs(kl_to_uniform(w_p) - 0.2) < 1e-6
        moved += int(not torch.equal(w, w_p))  # ...in another order
    assert len(seen[True]) == 2 and moved >= 1


def pattern_examples(n: int, seed: int) -> list[Example]:
    """Arithmetic progressions (stride 3): a structured 'task' the validation set is made of."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        ids = [1 + (start + 3 * k - 1) % (VOCAB - 1) for k in range(14)]
        out.append(Example(input_ids=ids, labels=[-100] * 4 + ids[4:], id=f"pat{i}"))
    return out


def test_tilt_moves_mass_to_traces_like_the_validation_solutions(tmp_path):
    from distillgame.clients.attack.distill import collate, example_values, validation_grad

    cfg = config(tmp_path, mode="adaptive", rho=0.3)
    masses = []
    for seed in range(4):
        model = add_lora(tiny_llama(seed), cfg)
        batch = collate(pattern_examples(6, 10 + seed) + random_examples(6, 20 + seed), PAD)
        g_val = validation_grad(model, pattern_examples(4, 30 + seed), PAD, 4)
        v = example_values(model, batch, g_val)
        w = tilt_weights(v, eta_for_budget(v, cfg.rho))
        assert v[:6].mean() > v[6:].mean()
        masses.append(float(w[:6].sum()))
    # Uniform weights would give the six structured traces mass 0.5.
    assert min(masses) > 0.5 and sum(masses) / len(masses) > 0.6


@pytest.mark.parametrize("mode", ["passive", "adaptive"])
def test_defaults_follow_the_paper(mode, tmp_path):
    cfg = DistillConfig(student="x", out=tmp_path, mode=mode)
    assert (cfg.rank, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.max_length) == (128, 5e-4, 3.0, 6, 4, 2048)
