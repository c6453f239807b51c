"""The released adaptive protocol's values and weights, the filtering attackers, and the passive limit.

Tiny random Llama folders (tests/tiny_models.py) with a BPE tokenizer trained on
the fly; every check is on numbers.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from distillgame.cli import main as cli
from distillgame.clients.attack.distill import (
    DistillConfig,
    add_lora,
    collate,
    fixed_released_weights,
    load_student,
    load_traces,
    per_example_nll,
    released_values,
    tokenize_pair,
    train,
    trainable_params,
)
from distillgame.clients.attack.filters import degenerate_reason, filter_records, longest_token_run
from distillgame.clients.attack.weights import released_weights, uniform_weights

from tiny_models import make_llama, make_tokenizer

CLEAN = [
    "Natalia sold 48 clips in April. 48 / 2 = 24 in May. 48 + 24 = 72. #### 72",
    "She earns $12 an hour. 50 minutes is 50 / 60 of an hour, 12 * 50 / 60 = 10. #### 10",
    "The fox jumps 3 times, then 4 more. 3 + 4 = 7. #### 7",
    "Step one, add the numbers: 5 + 6 = 11. Step two, check the answer. #### 11",
    "A student learns from traces: 9 - 2 = 7, and 7 * 2 = 14. #### 14",
    "Half of 48 is 24, and 24 + 1 = 25. #### 25",
    # Greek, accented Latin and mathematical symbols are expected in math traces.
    "The circle has area π r² with r = 1, about 3.14 × 1; café prices √4 = 2. #### 2",
]
REPEAT = "Natalia sold clips!!!!!!!!!!!! to her friends. #### 72"  # '!' ten-plus times in a row
SCRIPT = "Natalia sold 48 clips, то есть 24 in May. #### 72"  # Cyrillic


def write_traces(path: Path, completions: list[str], answers: list[str] | None = None, prefix: str = "t") -> Path:
    with open(path, "w") as f:
        for i, c in enumerate(completions):
            answer = answers[i] if answers else c.rsplit("#### ", 1)[-1]
            f.write(json.dumps({"id": f"{prefix}{i:03d}", "prompt": f"Question: problem {i}?\nAnswer: ",
                                "completion": c, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("student"), make_tokenizer(), hidden=64, heads=1, seed=1)


def released_cfg(student: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), out=out, mode="adaptive", weighting="released", rank=4, batch_size=3,
                max_length=96, seed=5, epochs=2, grad_accum=1, lr=1e-2)
    base.update(kw)
    return DistillConfig(**base)


def read_values(path: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return ([r["id"] for r in rows], torch.tensor([r["value"] for r in rows], dtype=torch.float64),
            torch.tensor([r["weight"] for r in rows], dtype=torch.float64))


def run_values(student: Path, traces: Path, val: Path, out: Path, *extra: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    rc = cli(["attack", "values", "--student", str(student), "--traces", str(traces), "--val-traces", str(val),
              "--weighting", "released", "--rank", "4", "--batch-size", "3", "--max-length", "96", "--seed", "5",
              "--out", str(out), *extra])
    assert rc == 0
    return read_values(out)


def test_released_values_equal_a_float64_central_difference(student, tmp_path):
    """``attack values`` against two perturbed float64 copies, each example alone (no padding)."""
    traces = write_traces(tmp_path / "traces.jsonl", CLEAN + [REPEAT])
    val = write_traces(tmp_path / "val.jsonl", CLEAN[:3], prefix="v")
    ids, a, w = run_values(student, traces, val, tmp_path / "values.jsonl", "--beta", "0.5", "--fd-eps", "0.01",
                           "--clip", "10")

    cfg = released_cfg(student, tmp_path)
    model, tok = load_student(cfg)
    model = add_lora(model, cfg).to(torch.float64)  # theta_0: the same seeded LoRA initialization
    train_set, _ = load_traces(traces, tok, cfg.max_length)
    val_set, _ = load_traces(val, tok, cfg.max_length)
    assert ids == [e.id for e in train_set]

    def nll(m: torch.nn.Module, e) -> torch.Tensor:
        return per_example_nll(m, collate([e], tok.pad_token_id))[0]

    params = trainable_params(model)
    loss = sum(nll(model, e) for e in val_set) / len(val_set)
    g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    copies = {}
    for sign in (1, -1):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in trainable_params(m).items():
                p.add_(sign * 0.01 * g[n])
        copies[sign] = m
    with torch.no_grad():
        a_ref = torch.stack([(nll(copies[-1], e) - nll(copies[1], e)) / 0.02 for e in train_set])

    assert float(a_ref.abs().min()) > 0 and float(a_ref.std()) > 0
    assert torch.allclose(a, a_ref, rtol=1e-6, atol=0.0), (a - a_ref).abs().max()
    w_ref = torch.exp(0.5 * a_ref.clamp(-10, 10))
    assert torch.allclose(w, w_ref / w_ref.mean(), rtol=1e-6, atol=0.0)
    assert abs(float(w.mean()) - 1.0) < 1e-12


def test_released_weights_have_mean_one_and_respect_the_clip():
    a = torch.tensor([-50.0, -10.0, -3.0, 0.0, 2.5, 10.0, 30.0], dtype=torch.float64)
    for beta, clip in ((0.5, 10.0), (1.0, 2.0), (0.1, 100.0)):
        w = released_weights(a, beta, clip)
        assert abs(float(w.mean()) - 1.0) < 1e-12
        clipped = torch.exp(beta * a.clamp(-clip, clip))
        assert torch.allclose(w, clipped / clipped.mean(), rtol=1e-12)
        assert float(w.max() / w.min()) <= math.exp(2 * beta * clip) * (1 + 1e-12)
    w = released_weights(a, 0.5, 10.0)
    assert w[0] == w[1] and w[5] == w[6]  # beyond the clip, no further weight
    assert torch.equal(released_weights(torch.zeros(4), 0.5, 10.0), torch.ones(4, dtype=torch.float64))
    # All beyond the clip on one side (the zoo's values under full fine-tuning, [-143, -14]):
    # exactly 1 each, not exp(-5) / mean(exp(-5), ...), which can be 1 +- 1 ulp.
    beyond = torch.tensor([-143.0, -50.0, -14.0, -37.5, -11.0, -99.0, -20.0], dtype=torch.float64)
    assert torch.equal(released_weights(beyond, 0.5, 10.0), torch.ones(7, dtype=torch.float64))
    assert torch.equal(released_weights(a, 0.0, 10.0), torch.ones(7, dtype=torch.float64))


def test_value_sign_minus_one_flips_the_order_of_the_weights(student, tmp_path):
    traces = write_traces(tmp_path / "traces.jsonl", CLEAN)
    val = write_traces(tmp_path / "val.jsonl", CLEAN[:2], prefix="v")
    _, a_pos, w_pos = run_values(student, traces, val, tmp_path / "plus.jsonl")
    _, a_neg, w_neg = run_values(student, traces, val, tmp_path / "minus.jsonl", "--value-sign", "-1")
    assert torch.equal(a_neg, -a_pos)
    assert len(set(w_pos.tolist())) == len(w_pos)  # distinct, so the order is well defined
    assert torch.equal(torch.argsort(w_pos), torch.argsort(w_neg, descending=True))
    assert abs(float(w_neg.mean()) - 1.0) < 1e-12


def test_degenerate_filter_drops_the_planted_traces_and_nothing_else(student, tmp_path):
    tok = make_tokenizer()
    assert longest_token_run(tok(REPEAT, add_special_tokens=False)["input_ids"]) >= 8
    assert degenerate_reason(SCRIPT, tok(SCRIPT, add_special_tokens=False)["input_ids"]) == "script"
    assert degenerate_reason("漢字 #### 1", []) == "script" and degenerate_reason("αβγ × ≤ é", []) is None
    for c in CLEAN:
        assert degenerate_reason(c, tok(c, add_special_tokens=False)["input_ids"]) is None, c

    completions = CLEAN[:3] + [REPEAT] + CLEAN[3:] + [SCRIPT]
    traces = write_traces(tmp_path / "traces.jsonl", completions)
    examples, dropped = load_traces(traces, tok, 96, ["degenerate"])
    assert dropped == {"degenerate": 2}
    assert [e.id for e in examples] == [f"t{i:03d}" for i in range(len(completions)) if i not in (3, len(completions) - 1)]

    # The same through `attack distill`, composed with the released weighting and the correct filter.
    answers = [c.rsplit("#### ", 1)[-1] for c in completions]
    answers[0] = "73"  # a wrong trace for the correct filter
    write_traces(traces, completions, answers)
    out = tmp_path / "run"
    rc = cli(["attack", "distill", "--traces", str(traces), "--student", str(student), "--out", str(out),
              "--mode", "adaptive", "--weighting", "released", "--val-traces", str(traces), "--filter", "degenerate",
              "--filter", "correct", "--rank", "4", "--epochs", "1", "--batch-size", "3", "--grad-accum", "1",
              "--max-length", "96", "--max-steps", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == {"degenerate": 2, "correct": 1} and summary["n_train"] == len(completions) - 3
    ids, _, w = read_values(out / "values.jsonl")
    assert len(ids) == summary["n_train"] and abs(float(w.mean()) - 1.0) < 1e-12


def test_correct_filter_keeps_right_final_answers_only():
    records = [{"id": "a", "completion": "2 + 2 = 4. #### 4", "answer": "4"},
               {"id": "b", "completion": "2 + 2 = 5. #### 5", "answer": "4"},
               {"id": "c", "completion": "It costs 1,234 dollars. #### 1,234", "answer": "1234"},
               {"id": "d", "completion": "no final answer here", "answer": "4"}]
    kept, dropped = filter_records(records, ["correct"])
    assert [r["id"] for r in kept] == ["a", "c"] and dropped == {"correct": 2}


def test_released_training_uses_fixed_weights_over_b_in_every_epoch(student, tmp_path):
    """Loss of a batch = sum_i w_i NLL_i / B with w_i from theta_0, the same in both epochs."""
    cfg = released_cfg(student, tmp_path, epochs=2)
    model, tok = load_student(cfg)
    model = add_lora(model, cfg)
    train_set = [tokenize_pair(tok, f"Question: {i}?\nAnswer: ", c, 96, f"t{i}") for i, c in enumerate(CLEAN)]
    val_set = train_set[:2]
    a, w = fixed_released_weights(model, train_set, val_set, cfg, tok.pad_token_id)
    theta_0 = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    assert torch.equal(a, released_values(model, train_set, val_set, cfg, tok.pad_token_id))  # the model is restored
    assert all(torch.equal(p, theta_0[n]) for n, p in trainable_params(model).items())
    seen: dict[str, list[float]] = {}

    def check(step, micro, batch, w_batch, v):
        idx = [next(i for i, e in enumerate(train_set) if e.id == x) for x in batch.ids]
        assert torch.equal(w_batch, w[idx] / len(idx))
        for x, wi in zip(batch.ids, (w_batch * len(idx)).tolist()):
            seen.setdefault(x, []).append(wi)

    history = train(model, train_set, val_set, cfg, tok.pad_token_id, on_step=check, fixed_weights=w)
    assert all(len(ws) == 2 and ws[0] == ws[1] for ws in seen.values()) and len(seen) == len(train_set)
    assert history[-1]["loss"] < history[0]["loss"]


def reference_passive_loop(model: torch.nn.Module, train_set, cfg: DistillConfig, pad_id: int) -> list[float]:
    """The passive student as the harness trained it before the released protocol existed."""
    from distillgame.clients.attack.distill import minibatch_order

    micro = minibatch_order(len(train_set), cfg.batch_size, cfg.epochs, cfg.seed)
    n_steps = math.ceil(len(micro) / cfg.grad_accum)
    params = list(trainable_params(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / n_steps)
    model.train()
    batches = iter(micro)
    losses = []
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            idx = next(batches, None)
            if idx is None:
                break
            batch = collate([train_set[i] for i in idx], pad_id)
            nll = per_example_nll(model, batch)
            loss = (uniform_weights(len(idx)).to(nll.dtype) * nll).sum() / cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(total)
    return losses


def test_passive_student_is_bit_identical_to_the_plain_loop(student, tmp_path):
    cfg = DistillConfig(student=str(student), out=tmp_path, mode="passive", rank=4, lr=1e-2, epochs=2,
                        batch_size=3, grad_accum=2, max_length=96, seed=2, weighting="released", beta=3.0)
    traces = write_traces(tmp_path / "traces.jsonl", CLEAN + [REPEAT, SCRIPT])
    finals, losses = {}, {}
    for name in ("harness", "reference"):
        model, tok = load_student(cfg)
        train_set, dropped = load_traces(traces, tok, cfg.max_length)
        assert dropped == {}
        model = add_lora(model, cfg)
        if name == "harness":
            losses[name] = [row["loss"] for row in train(model, train_set, [], cfg, tok.pad_token_id)]
        else:
            losses[name] = reference_passive_loop(model, train_set, cfg, tok.pad_token_id)
        finals[name] = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    assert losses["harness"] == losses["reference"]
    assert all(torch.equal(finals["harness"][n], finals["reference"][n]) for n in finals["reference"])


def test_beta_rho_variant_spends_the_kl_budget_over_the_whole_set(student, tmp_path):
    from distillgame.clients.attack.weights import kl_to_uniform

    traces = write_traces(tmp_path / "traces.jsonl", CLEAN)
    val = write_traces(tmp_path / "val.jsonl", CLEAN[:2], prefix="v")
    _, a, w_fixed = run_values(student, traces, val, tmp_path / "fixed.jsonl")
    _, a_kl, w = run_values(student, traces, val, tmp_path / "kl.jsonl", "--beta-rho", "0.05")
    assert torch.equal(a, a_kl)
    assert abs(kl_to_uniform(w / w.sum()) - 0.05) < 1e-6 and abs(float(w.mean()) - 1.0) < 1e-12
    assert torch.equal(torch.argsort(w), torch.argsort(w_fixed))  # the same order, another spread
