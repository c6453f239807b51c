"""Smoke run of ``distillgame attack table``: the whole protocol with tiny budgets.

It drives our own ``distillgame serve`` (a real vLLM engine with the defense
processor) over HTTP, distills a passive and a released-protocol adaptive
student with PEFT (the other attackers are the same loop with other weights or
filters, checked in test_attack_values.py and test_attack_distill.py; running
them all here would add a vLLM evaluation each), and scores them with
``distillgame eval``. It uses the zoo (bench/zoo) when its
checkpoints are present; otherwise the embedded default teacher/proxy and a
tiny random student with the teacher's tokenizer stand in (the numbers are then
meaningless, the protocol and the files are what is checked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "bench" / "zoo"


def zoo_ready() -> bool:
    return all((ZOO / m / "config.json").exists() for m in ("teacher", "proxy", "student-base"))


def tiny_student(folder: Path) -> Path:
    """A 2-layer random Llama (head_dim 64 for vLLM's CPU attention) with the default teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distillgame.models import default_teacher

    tok = AutoTokenizer.from_pretrained(default_teacher())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# About 6 minutes on 2 cores (a server, a collection per setting, five vLLM evaluations): make test-slow.
@pytest.mark.slow
def test_attack_table_smoke_writes_table1(tmp_path):
    out = tmp_path / "table"
    if zoo_ready():
        models = []
    else:
        models = ["--teacher", "default", "--proxy", "default", "--student", str(tiny_student(tmp_path / "student"))]
    cmd = [sys.executable, "-m", "distillgame.cli", "attack", "table", "--out", str(out), *models,
           "--settings", "none;poe:gamma=0.65", "--seeds", "1", "--n-train", "6", "--n-test", "6", "--n-val", "2",
           "--max-tokens", "48", "--epochs", "1", "--lora", "--rank", "4", "--batch-size", "3", "--grad-accum", "1",
           "--max-length", "256", "--attackers", "passive,adaptive-released", "--n-val-traces", "4", "--val-acc-n", "4",
           "--timing-rounds", "2", "--timing-prompts", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    table = json.loads((out / "table1.json").read_text())
    assert [r["teacher"] for r in table["rows"]] == ["none", "poe-gamma0.65"]
    assert table["command"].startswith("distillgame attack table")
    assert 0.0 <= table["student_base_acc"] <= 1.0
    for r in table["rows"]:
        for key in ("teacher_acc", "passive_acc", "adaptive_acc"):
            assert set(r[key]) == {"mean", "sem", "n"} and 0.0 <= r[key]["mean"] <= 1.0
        assert r["passive_acc"]["n"] == r["adaptive_acc"]["n"] == 1
        assert list(r["attackers"]) == ["passive", "adaptive-released"] and r["adaptive"] == "adaptive-released"
        assert r["strongest"] in r["attackers"]
        assert all(set(a) == {"mean", "sem", "n", "dropped"} for a in r["attackers"].values())
        assert r["teacher_acc"]["n"] == 6
        assert r["time_cost"] > 0 and r["timing"]["wall_s"] > 0 and r["timing"]["tokens"] > 0
    assert table["rows"][0]["time_cost"] == 1.0
    # Two interleaved rounds of 3 prompts per setting, the second in the other order.
    timing = json.loads((out / "runs" / "timing" / "timing.json").read_text())
    assert timing["rounds"] == 2 and timing["prompts"] == 3
    for r in range(2):
        for setting in ("none", "poe-gamma0.65"):
            assert len((out / "runs" / "timing" / f"round{r}" / f"{setting}.jsonl").read_text().splitlines()) == 3
    md = (out / "table1.md").read_text()
    assert "| Standard |" in md and "POE (gamma=0.65)" in md and "adaptive-released" in md

    # Same traces for both students; the adaptive one weighted them by the undefended
    # teacher's validation traces, with weights of mean 1 that are not all equal.
    val = [json.loads(x) for x in (out / "runs" / "none" / "val_traces.jsonl").read_text().splitlines()]
    assert len(val) == 4 and all(v["split"] == "validation" for v in val)
    for setting in ("none", "poe-gamma0.65"):
        traces = [json.loads(x) for x in (out / "runs" / setting / "traces.jsonl").read_text().splitlines()]
        assert len({t["id"] for t in traces}) == len(traces) == 6
        passive = json.loads((out / "runs" / setting / "passive-seed0" / "summary.json").read_text())
        adaptive = json.loads((out / "runs" / setting / "adaptive-released-seed0" / "summary.json").read_text())
        assert passive["steps"] == adaptive["steps"] and passive["n_train"] == adaptive["n_train"]
        assert adaptive["val_traces"].endswith("none/val_traces.jsonl")
        weights = [json.loads(x)["weight"] for x in (out / "runs" / setting / "adaptive-released-seed0" /
                                                     "values.jsonl").read_text().splitlines()]
        assert len(weights) == 6 and abs(sum(weights) / 6 - 1.0) < 1e-9 and max(weights) > min(weights)


def test_time_cost_is_each_settings_wall_over_the_undefended_ones_and_per_token():
    from distillgame.clients.attack.table import time_costs

    costs = time_costs({"none": {"wall_s": 10.0, "tokens": 1000},
                        "poe": {"wall_s": 16.0, "tokens": 800},
                        "ads": {"wall_s": 30.0, "tokens": 1200}})
    assert costs["none"] == {"time_cost": 1.0, "time_cost_per_token": 1.0}
    assert costs["poe"]["time_cost"] == pytest.approx(1.6) and costs["poe"]["time_cost_per_token"] == pytest.approx(2.0)
    assert costs["ads"]["time_cost"] == pytest.approx(3.0) and costs["ads"]["time_cost_per_token"] == pytest.approx(2.5)


def test_attacker_columns_strongest_and_the_better_adaptive_protocol(tmp_path):
    from distillgame.clients.attack.table import aggregate_attackers, parse_attackers

    def cells(*accs, dropped=0):
        return [{"acc": a, "dropped": dropped} for a in accs]

    row = aggregate_attackers({
        "passive": cells(0.30, 0.34),
        "adaptive-minibatch": cells(0.10, 0.12),
        "adaptive-released": cells(0.28, 0.30),
        "filter-correct": cells(0.35, 0.37, dropped=120),
        "filter-degenerate": cells(0.31, 0.33, dropped=2),
        "placebo": cells(0.50, 0.50),  # a control: never the strongest
    })
    assert row["strongest"] == "filter-correct" and row["adaptive"] == "adaptive-released"
    assert row["attackers"]["filter-correct"] == {"mean": 0.36, "sem": row["attackers"]["filter-correct"]["sem"],
                                                  "n": 2, "dropped": 120}
    assert abs(row["attackers"]["filter-correct"]["sem"] - 0.01) < 1e-12
    assert abs(row["passive_acc"]["mean"] - 0.32) < 1e-12 and set(row["passive_acc"]) == {"mean", "sem", "n"}
    assert abs(row["adaptive_acc"]["mean"] - 0.29) < 1e-12
    assert abs(row["rel_gain"] - (0.29 / 0.32 - 1)) < 1e-12

    # Students reused from passive's keep why, and the table says it.
    reused = aggregate_attackers({
        "passive": cells(0.30, 0.34),
        "adaptive-released": [{**c, "as_passive": True, "as_passive_why": "its weights are all equal"}
                              for c in cells(0.30, 0.34)],
        "filter-degenerate": [{**c, "as_passive": True, "as_passive_why": "its filters drop no trace"}
                              for c in cells(0.30, 0.34)],
    })
    assert reused["attackers"]["adaptive-released"]["as_passive_why"] == "its weights are all equal"
    assert reused["attackers"]["filter-degenerate"]["as_passive_why"] == "its filters drop no trace"
    assert "as_passive" not in reused["attackers"]["passive"]
    from distillgame.clients.attack.table import write_markdown

    result = {"partial": False, "missing_cells": 0, "student_base_acc": 0.0, "command": "x",
              "config": {"task": "gsm-symbolic-easy", "seeds": 2, "timing_rounds": 3, "timing_prompts": 64},
              "rows": [{"label": "Standard", "teacher_acc": {"mean": 0.8, "sem": 0.02, "n": 500}, "time_cost": 1.0,
                        **reused}]}
    write_markdown(tmp_path / "t.md", result)
    md = (tmp_path / "t.md").read_text()
    assert "32.00% ± 2.00 (n=2) (= passive: equal weights) | 32.00% ± 2.00 (n=2) (= passive: 0 dropped) |" in md

    only_passive = aggregate_attackers({"passive": cells(0.2)})
    assert only_passive["strongest"] == "passive" and only_passive["adaptive_acc"] is None
    assert only_passive["rel_gain"] is None

    assert parse_attackers("filter-correct,adaptive-released") == ["passive", "adaptive-released", "filter-correct"]
    assert parse_attackers([], placebo=True) == ["passive", "placebo"]
    assert parse_attackers("adaptive-released-neg") == ["passive", "adaptive-released-neg"]
    from distillgame.clients.attack.table import DEFAULT_ATTACKERS

    assert DEFAULT_ATTACKERS == ["passive", "adaptive-minibatch", "adaptive-released", "filter-correct",
                                 "filter-degenerate"]
    with pytest.raises(ValueError):
        parse_attackers("passive,teacher")


def test_policy_gives_each_setting_its_own_key_and_defense(tmp_path):
    from distillgame.clients.attack.table import parse_settings, write_policy
    from distillgame.server.policy import load_policy

    settings = parse_settings("none;poe:gamma=0.65;ads:lam=0.05,eps=1e-4")
    assert [s.name for s in settings] == ["none", "poe-gamma0.65", "ads-lam0.05-eps0.0001"]
    keys = write_policy(tmp_path / "policy.toml", settings)
    policy = load_policy(tmp_path / "policy.toml")  # the server's own loader accepts it
    for s in settings:
        tier = policy.authenticate(keys[s.name])
        assert tier.defense.mode == s.defense["mode"]
        assert tier.defense.gamma == s.defense.get("gamma") and tier.defense.lam == s.defense.get("lam")


def test_a_settings_own_proxy_reaches_its_server_and_ads_keeps_the_tables(tmp_path):
    import argparse

    from distillgame.clients import cli
    from distillgame.clients.attack.table import (Setting, TableConfig, proxy_tag, server_command, server_groups,
                                                  time_costs)

    (tmp_path / "table.yaml").write_text(
        "proxy: zoo/proxy\nads_grad: zoo/proxy-ads-grad.safetensors\nsettings:\n"
        "  - {name: poe-gamma0.65, defense: {mode: poe, gamma: 0.65}}\n"
        "  - {name: ads-lam0.75, defense: {mode: ads, lam: 0.75, eps: 1.0e-4}}\n"
        "  - {name: poe-exit2-gamma0.9, defense: {mode: poe, gamma: 0.9}, proxy: zoo/proxy-exit2}\n")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["attack", "table", "--config", str(tmp_path / "table.yaml"), "--out", str(tmp_path)])
    cfg = TableConfig.from_args(args)
    groups = server_groups(cfg.all_settings())
    assert {p: [s.name for s in g] for p, g in groups.items()} == {
        None: ["none", "poe-gamma0.65", "ads-lam0.75"], "zoo/proxy-exit2": ["poe-exit2-gamma0.9"]}
    assert groups["zoo/proxy-exit2"][0].label == "POE (gamma=0.9, proxy=proxy-exit2)"

    def flags(cmd: list[str]) -> dict[str, str]:
        return {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}

    table = flags(server_command(cfg, None, tmp_path / "policy.toml", 8001))
    own = flags(server_command(cfg, "zoo/proxy-exit2", tmp_path / f"policy{proxy_tag('zoo/proxy-exit2')}.toml", 8002))
    assert table["--proxy"] == "zoo/proxy" and table["--ads-grad"] == "zoo/proxy-ads-grad.safetensors"
    assert own["--proxy"] == "zoo/proxy-exit2" and "--ads-grad" not in own
    assert own["--policy"].endswith("policy-proxy-exit2.toml") and own["--teacher"] == table["--teacher"]
    # The setting's time cost is against the undefended teacher on its own server.
    own_none = {"wall_s": 5.0, "tokens": 100}
    costs = time_costs({"none": {"wall_s": 10.0, "tokens": 100},
                        "poe-exit2-gamma0.9": {"wall_s": 6.0, "tokens": 100, "baseline": own_none}})
    assert costs["poe-exit2-gamma0.9"]["time_cost"] == pytest.approx(1.2)
    with pytest.raises(ValueError, match="only a PoE setting"):
        TableConfig(out=tmp_path, settings=[Setting("ads-own", {"mode": "ads", "lam": 0.5}, proxy="zoo/proxy-exit2")])


def test_a_resumed_table_starts_only_the_server_of_the_new_settings_proxy(tmp_path, monkeypatch):
    """The undefended teacher collected and timed before: only the new setting's server starts, and its
    timing pass (beside a ``none`` of its own) leaves the table's pass alone."""
    from distillgame.clients.attack import table

    cfg = table.TableConfig(out=tmp_path / "out", work=tmp_path / "work", n_train=2, n_test=2, collect_only=True,
                            attackers=["passive"],
                            settings=[table.Setting("poe-exit", {"mode": "poe", "gamma": 0.9}, proxy="zoo/exit")])
    summary = {"n_records": 2, "accuracy": 0.5}

    def fake_collect(cfg, setting, base_url, api_key):  # what collect leaves in work
        (cfg.work / setting.name).mkdir(parents=True, exist_ok=True)
        for name in ("traces.jsonl", "teacher_test.jsonl"):
            (cfg.work / setting.name / f"{name}.summary.json").write_text(json.dumps(summary))
        return {"traces": summary, "teacher": summary}

    fake_collect(cfg, table.Setting("none", {"mode": "none"}), "", "")
    (cfg.work / "timing").mkdir()
    table._timing_path(cfg).write_text(json.dumps({"settings": ["none"], "rounds": 3, "prompts": 64,
                                                   "per_setting": {"none": {"wall_s": 10.0, "tokens": 100}}}))
    started = []

    class FakeServer:
        def __init__(self, cfg, settings, proxy=None):
            started.append((proxy, [s.name for s in settings]))
            self.base_url, self.keys = "http://fake/v1", {s.name: s.name for s in settings}

        def close(self):
            pass

    def fake_time(cfg, settings, base_url, keys, proxy=None):
        walls = {"none": {"wall_s": 5.0, "tokens": 100}, "poe-exit": {"wall_s": 6.0, "tokens": 90}}
        path = table._timing_path(cfg, proxy)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": [s.name for s in settings], "rounds": 3, "prompts": 64,
                                    "per_setting": walls}))

    monkeypatch.setattr(table, "Server", FakeServer)
    monkeypatch.setattr(table, "collect_setting", fake_collect)
    monkeypatch.setattr(table, "time_settings", fake_time)
    result = table.run_table(cfg)
    assert started == [("zoo/exit", ["none", "poe-exit"])]
    assert result["timing"]["none"] == {"wall_s": 10.0, "tokens": 100}
    assert result["timing"]["poe-exit"]["baseline"] == {"wall_s": 5.0, "tokens": 100}
    assert table.time_costs(result["timing"])["poe-exit"]["time_cost"] == pytest.approx(1.2)
    assert table.run_table(cfg)["timing"] == result["timing"] and len(started) == 1  # resumed: no server


def test_mean_sem_and_frontier_png(tmp_path):
    from distillgame.clients.attack.table import draw_attackers, draw_frontier, mean_sem

    m = mean_sem([0.5, 0.6, 0.7])
    assert m["n"] == 3 and abs(m["mean"] - 0.6) < 1e-12 and abs(m["sem"] - 0.1 / 3**0.5) < 1e-12
    assert mean_sem([0.4]) == {"mean": 0.4, "sem": 0.0, "n": 1}
    rows = [
        {"defense": {"mode": mode, **({"gamma": g} if mode == "poe" else {})},
         "teacher_acc": mean_sem([t]), "passive_acc": mean_sem([p, p + 0.02]), "adaptive_acc": mean_sem([a, a + 0.01]),
         "attackers": {"passive": mean_sem([p, p + 0.02]), "filter-correct": mean_sem([a, a + 0.03])},
         "strongest": "filter-correct"}
        for mode, g, t, p, a in [("none", 0, 0.8, 0.5, 0.5), ("poe", 0.5, 0.75, 0.4, 0.45), ("poe", 0.8, 0.6, 0.3, 0.4)]
    ]
    draw_frontier(tmp_path / "frontier.png", rows)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        r["label"] = r["defense"]["mode"]
    draw_attackers(tmp_path / "table1.png", rows)
    assert (tmp_path / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_child_dies_when_the_table_process_is_killed(tmp_path):
    """A table killed by SIGKILL (or a timeout) must not leave its server running."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from distillgame.clients.attack.table import _die_with_parent\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                     start_new_session=True, preexec_fn=_die_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        # The parent imports the attack package (torch, transformers, peft) first:
        # over a minute on a loaded 2-core machine.
        deadline = time.time() + 600
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            assert parent.poll() is None, "the parent exited before starting its child"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive while its parent lives
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # The child is reparented to init (or a subreaper), which reaps it once it exits.
        try:
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the server child outlived its killed parent")


def test_released_weights_all_equal_make_passive_bit_for_bit_and_are_not_trained_again(tmp_path):
    """Under full fine-tuning the released protocol's values at theta_0 can all lie beyond the
    clip on one side (the zoo's: [-143, -14] against a clip of 10); its weights are then all
    equal and the table reuses passive's students. That is only sound if the two students are
    the same bit for bit, which this trains and checks; with the clip wide enough to leave the
    values their spread it must not be reused."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from distillgame.clients.attack.distill import distill
    from distillgame.clients.attack.table import (
        Setting, TableConfig, cell_config, released_weights_uniform, val_traces_path,
    )
    from test_attack_values import CLEAN, write_traces
    from tiny_models import make_llama, make_tokenizer

    student = make_llama(tmp_path / "student", make_tokenizer(), hidden=64, heads=1, seed=1)
    none = Setting("none", {"mode": "none"})
    (tmp_path / "none").mkdir()
    write_traces(tmp_path / "none" / "traces.jsonl", CLEAN)
    write_traces(tmp_path / "none" / "val_traces.jsonl", CLEAN)
    base = TableConfig(out=tmp_path / "out", work=tmp_path, student=str(student), max_length=96, lora=False,
                       lr=1e-2, epochs=2, batch_size=3, grad_accum=1, val_acc_n=0)
    wide = dataclasses.replace(base, clip=1e6, out=tmp_path / "out-wide")
    assert not released_weights_uniform(wide, none, "adaptive-released")
    stats = json.loads((wide.out / "table1_cells" / "none" / "released-values.json").read_text())
    assert stats["a_min"] < stats["a_max"] and stats["w_min"] < 1.0 < stats["w_max"]

    # Every value beyond the clip on the same side (as the zoo's: all negative); exp(beta * -clip)
    # is not 1, so the weights are exactly 1 only because they are all equal.
    assert stats["a_max"] < 0
    cfg = dataclasses.replace(base, clip=-stats["a_max"] / 2)
    assert released_weights_uniform(cfg, none, "adaptive-released")
    assert not released_weights_uniform(cfg, none, "passive")  # not the released protocol
    assert not released_weights_uniform(dataclasses.replace(cfg, lora=True), none, "adaptive-released")
    written = [json.loads(line) for line in (tmp_path / "none" / "released-values.jsonl").read_text().splitlines()]
    assert len(written) == len(CLEAN) and {r["weight"] for r in written} == {1.0}

    weights = {}
    for name in ("passive", "adaptive-released"):
        dcfg = cell_config(cfg, name, 3, tmp_path / name)
        distill(dataclasses.replace(dcfg, save_merged=False), tmp_path / "none" / "traces.jsonl",
                val_traces=val_traces_path(cfg) if name != "passive" else None)
        weights[name] = load_file(str(tmp_path / name / "merged" / "model.safetensors"))
    assert weights["passive"].keys() == weights["adaptive-released"].keys()
    assert all(torch.equal(weights["passive"][k], weights["adaptive-released"][k]) for k in weights["passive"])
    initial = load_file(str(student / "model.safetensors"))
    assert any(not torch.equal(initial[k], weights["passive"][k]) for k in initial if k in weights["passive"])


def test_a_filter_that_drops_nothing_is_passive_bit_for_bit_and_is_not_trained_again(tmp_path):
    """The table reuses passive's students for a filter that keeps every trace; that is only sound if the two
    students are the same bit for bit, which this trains and checks."""
    import torch
    from safetensors.torch import load_file

    from distillgame.clients.attack.distill import DistillConfig, distill
    from distillgame.clients.attack.table import ATTACKERS, Setting, TableConfig, filters_drop_nothing
    from test_attack_values import CLEAN, REPEAT, write_traces
    from tiny_models import make_llama, make_tokenizer

    student = make_llama(tmp_path / "student", make_tokenizer(), hidden=64, heads=1, seed=1)
    clean, dirty = Setting("clean", {"mode": "none"}), Setting("dirty", {"mode": "none"})
    for setting, completions in ((clean, CLEAN), (dirty, CLEAN + [REPEAT])):
        (tmp_path / setting.name).mkdir()
        write_traces(tmp_path / setting.name / "traces.jsonl", completions)
    cfg = TableConfig(out=tmp_path, work=tmp_path, student=str(student), max_length=96)
    assert filters_drop_nothing(cfg, clean, "filter-degenerate") and filters_drop_nothing(cfg, clean, "filter-correct")
    assert not filters_drop_nothing(cfg, dirty, "filter-degenerate")  # drops the repeated-token trace
    assert not any(filters_drop_nothing(cfg, clean, a) for a in ("passive", "adaptive-released", "adaptive-minibatch"))

    adapters = {}
    for name in ("passive", "filter-degenerate"):
        out = tmp_path / name
        distill(DistillConfig(student=str(student), out=out, rank=4, lr=1e-2, epochs=2, batch_size=3, grad_accum=1,
                              max_length=96, seed=3, save_merged=False, **ATTACKERS[name]),
                tmp_path / "clean" / "traces.jsonl")
        adapters[name] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapters["passive"].keys() == adapters["filter-degenerate"].keys()
    assert all(torch.equal(adapters["passive"][k], adapters["filter-degenerate"][k]) for k in adapters["passive"])
    # and training moved them: an untrained LoRA would make the check above vacuous
    assert any(float(v.abs().max()) > 0 for k, v in adapters["passive"].items() if "lora_B" in k)
