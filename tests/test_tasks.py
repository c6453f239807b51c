"""Tasks: split construction, dataset loaders on fixture files, prompts and answer checking."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from distillgame import tasks
from distillgame.evaluate import score_completions, write_results

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def test_gsm_symbolic_splits_are_deterministic_and_disjoint():
    train = tasks.load_problems("gsm-symbolic-easy", "train", n=300)
    again = tasks.load_problems("gsm-symbolic-easy", "train", n=300)
    test = tasks.load_problems("gsm-symbolic-easy", "test", n=300)
    val = tasks.load_problems("gsm-symbolic-easy", "validation", n=300)
    assert [p.to_json() for p in train] == [p.to_json() for p in again]
    seeds = {s: {p.id.split("-s")[1] for p in ps} for s, ps in (("train", train), ("test", test), ("val", val))}
    assert not seeds["train"] & seeds["test"] and not seeds["train"] & seeds["val"] and not seeds["test"] & seeds["val"]
    # Question text, not only the seed, is disjoint between training and evaluation.
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.question for p in test}) == len(test)
    # Templates are shared across splits and drawn evenly.
    counts = Counter(p.id.split("-")[0] for p in test)
    assert set(counts) == {f"t{t}" for t in tasks.EASY_TEMPLATES}
    assert min(counts.values()) > 300 / len(tasks.EASY_TEMPLATES) / 2
    # A prefix of a split is the same problems: n only truncates.
    assert [p.id for p in tasks.load_problems("gsm-symbolic-easy", "test", n=50)] == [p.id for p in test[:50]]


def test_gsm_symbolic_problem_carries_its_chain_of_thought():
    p = tasks.load_problems("gsm-symbolic", "test", n=5)[0]
    assert p.solution is not None and p.solution.rstrip().endswith(f"#### {p.answer}")
    assert tasks.is_correct(p.solution, p.answer)
    prompt, completion = tasks.training_text(p, "gsm-symbolic")
    assert prompt == f"Question: {p.question}\nAnswer: " and completion == p.solution


def test_gsm8k_loader_reads_hub_format_and_strips_commas():
    data = FIXTURES / "gsm8k"
    test = tasks.load_problems("gsm8k", "test", data_dir=data)
    assert [p.answer for p in test] == ["1235", "2", "180", "7"]
    assert test[0].question.startswith("A library has 2,340 books")
    parts = {s: tasks.load_problems("gsm8k", s, data_dir=data) for s in ("train", "holdout", "validation")}
    ids = [p.id for s in parts.values() for p in s]
    # The train file is partitioned: every row lands in exactly one split.
    assert sorted(ids) == sorted(f"gsm8k-train-{i}" for i in range(10))
    assert (len(parts["train"]), len(parts["holdout"]), len(parts["validation"])) == (7, 2, 1)
    by_id = {p.id: p for s in parts.values() for p in s}
    assert by_id["gsm8k-train-0"].answer == "1550" and by_id["gsm8k-train-8"].answer == "17250"
    sub = tasks.load_problems("gsm8k", "train", n=3, seed=1, data_dir=data)
    assert len(sub) == 3 and sub == tasks.load_problems("gsm8k", "train", n=3, seed=1, data_dir=data)


def test_math_loader_takes_last_boxed_answer_with_nested_braces():
    data = FIXTURES / "math"
    test = tasks.load_problems("math", "test", data_dir=data)
    assert [p.answer for p in test] == ["\\frac{4}{9}", "4", "\\frac{1}{6}"]
    train = [p for s in ("train", "holdout", "validation") for p in tasks.load_problems("math", s, data_dir=data)]
    # The one solution without \boxed{} has no reference answer and is skipped.
    assert len(train) == 9
    assert {p.answer for p in train} >= {"\\frac{3}{4}", "\\dfrac{1}{6}", "\\frac{5}{2}", "0.375"}
    assert "\\boxed{}" in tasks.build_prompt(test[0], "math")


def test_jsonl_task_reads_outside_problem_sets():
    problems = tasks.load_problems(f"jsonl:{FIXTURES / 'outside.jsonl'}", "test")
    assert [(p.id, p.answer) for p in problems] == [("o0", "4"), ("o1", "1,234"), ("o2", "\\frac{3}{2}")]


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("So 1,000 + 234 = 1,234 marbles.\n#### 1,234", "1234", True),
        ("#### 1,234", "1,234", True),
        ("#### 1234.", "1,234", True),
        ("#### 1,243", "1234", False),
        ("The total is $\\boxed{\\frac{3}{4}}$.", "0.75", True),
        ("The total is $\\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}", True),
        ("$\\boxed{\\frac{6}{8}}$", "\\frac{3}{4}", True),
        ("$\\boxed{\\frac{4}{3}}$", "\\frac{3}{4}", False),
        ("$\\boxed{\\left(\\frac{2}{3}\\right)^2}$", "\\frac{4}{9}", True),
        ("first \\boxed{5} then corrected \\boxed{7}", "7", True),
        ("first \\boxed{5} then corrected \\boxed{7}", "5", False),
        ("the steps end without a final answer", "7", False),
        ("#### -3", "-3", True),
        ("#### 12.50", "12.5", True),
    ],
)
def test_is_correct_uses_math_verify_equivalence(completion: str, answer: str, expected: bool):
    assert tasks.is_correct(completion, answer) is expected


def test_extract_answer_prefers_hash_marker_over_boxed():
    assert tasks.extract_answer("\\boxed{3}\n#### 4") == "4"
    assert tasks.extract_answer("Total: $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert tasks.extract_answer("#### 2,000") == "2000"
    assert tasks.extract_answer("nothing here") is None


def test_chat_messages_state_the_answer_format():
    p = tasks.Problem(id="x", question=" What is 2+2? ", answer="4")
    messages = tasks.build_chat_messages(p, "gsm8k")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "What is 2+2?" and "####" in messages[0]["content"]


def test_unknown_task_and_split_are_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_problems("gsm9k", "test")
    with pytest.raises(ValueError, match="split"):
        tasks.load_problems("gsm-symbolic", "dev", n=1)


def test_scoring_writes_results_and_summary(tmp_path: Path):
    problems = tasks.load_problems(f"jsonl:{FIXTURES / 'outside.jsonl'}", "test")
    rows = score_completions(problems, ["#### 4", "#### 1234", "\\boxed{1.5} ... #### 2"])
    summary = write_results(rows, tmp_path, {"model": "m"})
    assert [r["correct"] for r in rows] == [True, True, False]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == pytest.approx(2 / 3) and on_disk["n"] == 3
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
