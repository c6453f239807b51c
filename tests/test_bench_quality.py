"""``distillgame bench quality``: released-trace quality per defense, end to end and measure by measure.

The end-to-end run is the ``--quick`` variant on the zoo pair (with an ADS setting added): a real
``distillgame serve`` over a real socket, traces through the ``openai`` SDK, the
same server as the rubric judge (its scores mean nothing; the counting and
parsing are what is checked). Every reported value is recomputed here from the
raw traces with transformers and the task checker.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "bench" / "zoo" / "teacher"


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoTokenizer

    from distillgame.plugins.reference import load_causal_lm

    return load_causal_lm(TEACHER), AutoTokenizer.from_pretrained(TEACHER)


def direct_perplexity(model, tok, prompt: str, completion: str) -> float:
    """exp of the mean completion-token NLL, from transformers' own shifted loss (prompt labels -100)."""
    import torch

    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss
    return math.exp(float(loss))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    cmd = [sys.executable, "-m", "distillgame.cli", "bench", "quality", "--quick",
           "--settings", "none;poe:gamma=0.9;ads:lam=2.04,eps=1e-4", "--judge-url", "self",
           "--out", str(out), "--work", str(out / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "quality.json").read_text())


@pytest.mark.timeout(480)
def test_quick_run_reports_every_measure_per_setting(quick_run, teacher):
    from distillgame import tasks
    from distillgame.bench.quality import parse_judge_score, repetition
    from distillgame.clients.attack.collect import read_records

    out, report = quick_run
    model, tok = teacher
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quality.md").read_text()
    assert md.startswith("# Trace quality per defense") and "| POE (gamma=0.9) |" in md and "meaningless" in md
    assert "bench quality --quick" in report["command"] and report["machine"]["cpus"] >= 1
    assert report["judge_is_self"] and report["judge"]["model"] == "teacher"
    assert [r["setting"] for r in report["results"]] == ["none", "poe-gamma0.9", "ads-lam2.04-eps0.0001"]
    assert (out / "work" / "ads_grad.safetensors").exists()  # computed from the task's validation solutions

    problems = tasks.load_problems("gsm-symbolic-easy", "test", n=4)
    for r in report["results"]:
        records = read_records(out / "work" / r["setting"] / "traces.jsonl")
        assert r["n"] == len(r["traces"]) == 4
        assert [t["id"] for t in r["traces"]] == [p.id for p in problems]
        for t in r["traces"]:
            rec = records[t["id"]]
            assert t["correct"] == tasks.is_correct(rec["completion"], rec["answer"])
            assert t["tokens"] == rec["usage"]["completion_tokens"] > 0
            assert t["repetition"] == repetition(rec["completion"])
            assert t["perplexity"] == pytest.approx(direct_perplexity(model, tok, rec["prompt"], rec["completion"]),
                                                    rel=1e-4)
            assert t["judge_score"] == parse_judge_score(t["judge_reply"])
        assert r["accuracy"] == pytest.approx(sum(t["correct"] for t in r["traces"]) / 4)
        assert r["length_mean"] == pytest.approx(sum(t["tokens"] for t in r["traces"]) / 4)
        assert r["perplexity_mean"] == pytest.approx(sum(t["perplexity"] for t in r["traces"]) / 4)
        j = r["judge"]
        assert j["n"] + j["unparseable"] + j["errors"] == 4
        assert sum(j["histogram"].values()) == j["n"]
        assert j["unparseable"] == sum(1 for t in r["traces"] if t["judge_error"] is None and t["judge_score"] is None)

    none, poe, ads = report["results"]
    # Tokens the proxy pulled toward itself are, by construction, less likely under the teacher.
    assert none["perplexity_mean"] < poe["perplexity_mean"] and none["perplexity_median"] < poe["perplexity_median"]
    assert none["engine_fidelity"] is None
    fid = poe["engine_fidelity"]
    assert fid["kl_per_token"] > 0.1 and 0.0 <= fid["argmax_agreement"] < 1.0
    assert fid["tokens"] == pytest.approx(sum(t["tokens"] for t in poe["traces"]), abs=4)
    # At this lam the float32 reference models give 0.29 nats/token; a bf16 proxy loses theta +- eps*g to
    # rounding and gave 11.5 (the bench serves in float32 for that reason).
    assert 0.0 < ads["engine_fidelity"]["kl_per_token"] < 2.0


def test_batched_perplexity_equals_exp_mean_nll_from_transformers(teacher):
    from distillgame.bench.quality import completion_nll, perplexity

    model, tok = teacher
    pairs = [
        ("Question: A child has 17 pencils. His friend has 6 fewer pencils than he has. How many pencils do they "
         "have together?\nAnswer: ", "His friend has 17 - 6 = 11 pencils.\nTogether, they have 17 + 11 = 28 "
         "pencils.\n#### 28"),
        ("Question: What is 2 + 2?\nAnswer: ", "#### 5"),
        ("Question: A loaf of bread costs €5.\nAnswer: ", "The cat sat on the mat, mat, mat."),
    ]
    # Batch of 3 (right padding) and batches of 1 give the same numbers as the direct computation.
    for batch_size in (3, 1):
        got = perplexity(model, tok, pairs, batch_size=batch_size)
        for (prompt, completion), ppl in zip(pairs, got):
            assert ppl == pytest.approx(direct_perplexity(model, tok, prompt, completion), rel=1e-4)
    sums = completion_nll(model, tok, pairs)
    assert [k for _, k in sums] == [len(tok(c, add_special_tokens=False)["input_ids"]) for _, c in pairs]
    ppl = perplexity(model, tok, pairs)
    assert ppl[0] < 2.0 < ppl[2]  # the teacher's own kind of solution vs text it never saw
    assert math.isnan(perplexity(model, tok, [("Question: 1\nAnswer: ", "")])[0])


def test_repetition_counts_repeated_word_4grams():
    from distillgame.bench.quality import repetition

    assert repetition("") == 0.0
    assert repetition("a b c") == 0.0  # no 4-gram at all
    assert repetition("one two three four five six") == 0.0
    # 5 four-grams, "a b c d" twice: 1 of 5 repeats an earlier one.
    assert repetition("a b c d a b c d") == pytest.approx(0.2)
    # 7 four-grams, all "x x x x": 6 repeats.
    assert repetition("x x x x x x x x x x") == pytest.approx(6 / 7)
    assert repetition("a  b\nc\td") == 0.0 and repetition("a b c d\na b c d", n=2) == pytest.approx(3 / 7)


@pytest.mark.parametrize("reply, score", [
    ("7", 7), ("10", 10), ("Score: 8/10", 8), ("**Score: 9**", 9), ("I would give it 7 out of 10.", 7),
    ("Score (1-10): 6", 6), ("The steps are fine. Score: 4", 4), ("score is 3 on a scale of 1 to 10", 3),
    ("9/10 because 3 steps are right", 9), ("Score: 10.", 10), ("8.", 8), ("Rating: 2", 2),
    ("7.5/10", None), ("7.5 out of 10", None), ("Score: 15", None), ("-3", None), ("0", None), ("N/A", None),
    ("", None), (None, None), ("The answer is 42", None), ("I cannot grade this.", None),
])
def test_judge_score_parser_on_hand_written_replies(reply, score):
    from distillgame.bench.quality import parse_judge_score

    assert parse_judge_score(reply) == score


def test_summary_counts_unparseable_and_failed_judge_replies():
    from distillgame.bench.quality import summarize
    from distillgame.clients.attack.table import Setting

    def row(correct, tokens, ppl, score, reply, error=None):
        return {"id": "x", "correct": correct, "finish_reason": "stop", "tokens": tokens, "scored_tokens": tokens - 1,
                "nll_sum": math.log(ppl) * (tokens - 1), "perplexity": ppl, "repetition": 0.1,
                "judge_requested": True, "judge_score": score, "judge_reply": reply, "judge_error": error}

    rows = [row(True, 11, 2.0, 8, "8"), row(False, 21, 4.0, 6, "Score: 6"), row(True, 31, 8.0, None, "great"),
            row(False, 41, 16.0, None, None, error="APIStatusError: 400")]
    s = summarize(Setting("poe-gamma0.5", {"mode": "poe", "gamma": 0.5}), rows)
    assert s["n"] == 4 and s["accuracy"] == 0.5
    assert s["length_mean"] == 26.0 and s["length_median"] == 26.0
    assert s["perplexity_mean"] == pytest.approx(7.5) and s["perplexity_median"] == pytest.approx(6.0)
    # Token-weighted: exp(sum NLL / sum tokens).
    want = math.exp((10 * math.log(2) + 20 * math.log(4) + 30 * math.log(8) + 40 * math.log(16)) / 100)
    assert s["perplexity_corpus"] == pytest.approx(want)
    j = s["judge"]
    assert (j["n"], j["unparseable"], j["errors"]) == (2, 1, 1)
    assert j["mean"] == 7.0 and j["sem"] == pytest.approx(1.0)
    assert j["histogram"]["8"] == j["histogram"]["6"] == 1 and sum(j["histogram"].values()) == 2
