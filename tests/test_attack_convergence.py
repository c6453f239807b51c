"""Convergence in the attack protocol: per-epoch validation accuracy, the plateau rule,
full fine-tuning, and the table's resumable cells and learning curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillgame.clients.attack.distill import (
    DistillConfig,
    add_lora,
    epoch_ends,
    minibatch_order,
    plateau_epoch,
    train,
    trainable_params,
)
from distillgame.clients.attack.table import (
    Setting,
    TableConfig,
    cell_path,
    convergence,
    learning_curves,
    load_cell,
    table_cells,
    write_markdown,
)

from test_attack_distill import PAD, config, random_examples, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "bench" / "zoo"


def test_plateau_rule_waits_for_the_best_so_far_to_stop_rising():
    # Still rising by more than a point every 3 epochs: no plateau.
    assert plateau_epoch([0.01, 0.05, 0.10, 0.15, 0.20, 0.25]) is None
    # Best 0.30 at epoch 3; epochs 4-6 add 0.004 over it: plateau at epoch 6.
    assert plateau_epoch([0.10, 0.20, 0.30, 0.29, 0.30, 0.304, 0.35]) == 6
    # A dip does not end training early: the running best is what counts.
    assert plateau_epoch([0.10, 0.20, 0.25, 0.05, 0.31, 0.36, 0.40]) is None
    # A wider window and a smaller gain are stricter.
    curve = [0.1, 0.2, 0.3, 0.302, 0.304, 0.306, 0.308, 0.31, 0.312, 0.313, 0.3135]
    assert plateau_epoch(curve) == 6
    assert plateau_epoch(curve, min_gain=0.004) == 11
    assert plateau_epoch(curve, window=6) == 11


def test_convergence_is_judged_at_the_end_of_the_schedule_not_at_an_early_stall():
    from distillgame.clients.attack.distill import converged_by

    stall_then_climb = [0.12] * 20 + [0.15, 0.2, 0.25, 0.29]  # annealing unlocks a stalled run
    assert plateau_epoch(stall_then_climb) == 4  # an early window fires...
    assert not converged_by(stall_then_climb, window=10)  # ...the end-of-schedule check does not
    flat_end = [0.1, 0.2, 0.3, 0.4, 0.42] + [0.415, 0.42, 0.41, 0.425, 0.42, 0.41, 0.415, 0.42, 0.42, 0.41]
    assert converged_by(flat_end, window=10)  # +0.5 points over 0.42 in the last 10
    assert not converged_by(flat_end, window=10, min_gain=0.005)
    assert not converged_by([0.1, 0.2], window=10)  # too short to judge


@pytest.mark.parametrize("n,batch,accum,epochs", [(10, 3, 2, 3), (25, 6, 4, 2.5), (24, 6, 4, 4), (7, 7, 1, 2)])
def test_epoch_ends_name_the_step_that_takes_each_epochs_last_minibatch(n, batch, accum, epochs):
    order = minibatch_order(n, batch, epochs, seed=0)
    seen, expected = 0, {}
    for micro, idx in enumerate(order):
        seen += len(idx)
        if seen % n == 0:  # this minibatch completes an epoch
            expected[micro // accum] = seen // n
    assert epoch_ends(n, batch, epochs, accum) == expected
    assert len(expected) == int(epochs)


def test_train_reports_validation_after_every_full_epoch(tmp_path):
    cfg = config(tmp_path, epochs=3, batch_size=4, grad_accum=2)
    train_set = random_examples(12, seed=1)  # 3 minibatches per epoch: steps straddle epochs
    calls = []

    def on_epoch(epoch, step):
        calls.append((epoch, step))
        return {"accuracy": epoch / 10, "n": 5}

    history = train(add_lora(tiny_llama(), cfg), train_set, [], cfg, PAD, on_epoch=on_epoch)
    assert calls == [(1, 1), (2, 2), (3, 4)]
    vals = [(r["step"], r["val"]["epoch"], r["val"]["accuracy"]) for r in history if "val" in r]
    assert vals == [(1, 1, 0.1), (2, 2, 0.2), (4, 3, 0.3)]
    assert len(history) == 5


def test_full_finetuning_trains_every_parameter(tmp_path):
    cfg = config(tmp_path, lora=False, epochs=2, lr=3e-3)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = add_lora(model, cfg)
    assert model.__class__.__name__ == "LlamaForCausalLM"  # no PEFT wrapper
    assert set(trainable_params(model)) == set(before)
    history = train(model, random_examples(16, seed=2), [], cfg, PAD)
    assert history[-1]["loss"] < history[0]["loss"]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(moved) == set(before)


@pytest.mark.skipif(not (ZOO / "teacher" / "config.json").exists(), reason="the zoo teacher is not built")
def test_greedy_accuracy_reproduces_the_vllm_evaluation_of_the_zoo_teacher():
    """The per-epoch validation pass (transformers, left-padded batches, cut at the stop
    strings) against the committed vLLM evaluation of the same model on the same problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillgame.clients.attack.distill import greedy_accuracy
    from distillgame.tasks import load_problems

    summary = json.loads((ZOO / "eval" / "teacher" / "summary.json").read_text())
    records = [json.loads(x) for x in (ZOO / "eval" / "teacher" / "results.jsonl").read_text().splitlines()[:24]]
    problems = load_problems(summary["task"], summary["split"], n=24)
    assert [p.id for p in problems] == [r["id"] for r in records]
    tok = AutoTokenizer.from_pretrained(ZOO / "teacher")
    model = AutoModelForCausalLM.from_pretrained(ZOO / "teacher", dtype=torch.float32)
    model.train()
    got = greedy_accuracy(model, tok, problems, summary["task"], summary["max_tokens"], batch_size=8,
                          return_completions=True)
    assert model.training  # left as it was found
    same = sum(a == r["completion"] for a, r in zip(got["completions"], records))
    # fp32 here against vLLM's bf16 kernels: a few near-ties may break the other way.
    assert same >= 18, same  # 20 of 24 when written
    vllm_acc = sum(r["correct"] for r in records) / len(records)
    assert got["n"] == 24 and abs(got["accuracy"] - vllm_acc) <= 2 / 24
    assert got["accuracy"] > 0.6  # the teacher solves most of them: the scoring path is live


def cells_cfg(tmp_path: Path, **kw) -> TableConfig:
    return TableConfig(out=tmp_path / "out", work=tmp_path / "work", seeds=3, sweep=True, sweep_gamma=[0.5],
                       sweep_lam=[1.0], ads_grad="g.safetensors", **kw)


def test_cells_run_passive_everywhere_first_and_sweep_points_get_fewer_attackers_and_seeds(tmp_path):
    cfg = cells_cfg(tmp_path)
    settings = cfg.all_settings()
    cells = [(s.name, a, seed) for s, a, seed in table_cells(cfg, settings)]
    main = ["none", "poe-gamma0.65", "ads-lam0.75-eps0.0001"]
    assert cells[:9] == [(s, "passive", seed) for seed in range(3) for s in main]
    assert cells[9:13] == [(s, "passive", seed) for seed in range(2) for s in ("poe-gamma0.5", "ads-lam1")]
    assert cells[13] == ("none", "filter-correct", 0)
    sweep = [c for c in cells if c[0] in ("poe-gamma0.5", "ads-lam1")]
    assert {a for _, a, _ in sweep} == {"passive", "filter-correct"} and max(seed for *_, seed in sweep) == 1
    assert sum(1 for c in cells if c[0] == "none") == 3 * len(cfg.attackers)
    assert cells.index(("none", "adaptive-minibatch", 0)) > max(
        i for i, c in enumerate(cells) if c[1] == "filter-correct")


def test_a_finished_cell_is_reused_only_for_the_same_student_recipe(tmp_path):
    cfg = cells_cfg(tmp_path, epochs=30)
    s = Setting("none", {"mode": "none"})
    from distillgame.clients.attack.table import cell_key

    path = cell_path(cfg, s, "passive", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"acc": 0.3, "dropped": 0, "key": cell_key(cfg, "passive", 1)}))
    assert load_cell(cfg, s, "passive", 1)["acc"] == 0.3
    assert load_cell(cfg, s, "passive", 0) is None  # another seed
    assert load_cell(cells_cfg(tmp_path, epochs=20), s, "passive", 1) is None  # another epoch count
    assert load_cell(cells_cfg(tmp_path, epochs=30, lora=True), s, "passive", 1) is None  # another recipe


def test_learning_curves_average_the_seeds_and_the_plateau_is_read_off_the_mean(tmp_path):
    def cell(accs):
        return {"acc": accs[-1], "dropped": 0,
                "learning_curve": [{"epoch": e + 1, "val_acc": a, "n": 200} for e, a in enumerate(accs)]}

    cells = {
        "none": {"passive": [cell([0.1, 0.2, 0.3, 0.30, 0.30, 0.30]), cell([0.1, 0.3, 0.3, 0.31, 0.31, 0.31]), None]},
        "poe-gamma0.65": {"passive": [cell([0.0, 0.05, 0.10, 0.15, 0.20])]},
    }
    curves = learning_curves(cells)
    assert curves["none"]["epochs"] == [1, 2, 3, 4, 5, 6] and len(curves["none"]["seeds"]) == 2
    assert curves["none"]["mean"] == pytest.approx([0.1, 0.25, 0.3, 0.305, 0.305, 0.305])
    conv = convergence(cells_cfg(tmp_path, epochs=6, plateau_window=3), curves)
    # mean best-so-far: 0.25 at epoch 2 -> 0.305 at epoch 5 (+5.5 points), 0.3 at 3 -> 0.305 at 6 (+0.5)
    assert conv["plateau_epoch"] == {"none": 6, "poe-gamma0.65": None}
    # the last 3 epochs (0.305) over the best before them (0.3): converged; PoE still climbs
    assert conv["converged_by_setting"] == {"none": True, "poe-gamma0.65": False}
    assert conv["converged"] is True and "1 points over the last 3 epochs" in conv["rule"]


def test_partial_table_markdown_says_so_and_marks_missing_attackers(tmp_path):
    row = {"label": "Standard", "teacher_acc": {"mean": 0.8, "sem": 0.02, "n": 500},
           "passive_acc": {"mean": 0.3, "sem": 0.0, "n": 1}, "adaptive_acc": None, "adaptive": None,
           "rel_gain": None, "strongest": "passive", "time_cost": 1.0,
           "attackers": {"passive": {"mean": 0.3, "sem": 0.0, "n": 1, "dropped": 0}}}
    row2 = {**row, "label": "PoE", "attackers": {**row["attackers"],
                                                 "filter-correct": {"mean": 0.2, "sem": 0.01, "n": 2, "dropped": 300}}}
    result = {"partial": True, "missing_cells": 30, "student_base_acc": None, "command": "distillgame attack table",
              "config": {"task": "gsm-symbolic-easy", "seeds": 3, "timing_rounds": 3, "timing_prompts": 64},
              "convergence": {"epochs": 40, "rule": "RULE", "plateau_epoch": {"none": 21}}, "rows": [row, row2]}
    write_markdown(tmp_path / "t.md", result)
    md = (tmp_path / "t.md").read_text()
    assert "PARTIAL: 30 cells not finished" in md and "Student base accuracy: n/a" in md
    assert "Epochs: 40. Plateau rule: RULE. Plateau epoch of the mean passive curve: none: 21." in md
    assert "| Standard | 30.00% ± 0.00 (n=1) | – |" in md
    assert "| PoE | 30.00% ± 0.00 (n=1) | 20.00% ± 1.00 (n=2) (-300) |" in md
