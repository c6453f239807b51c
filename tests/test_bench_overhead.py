"""``distillgame bench overhead``: the report's arithmetic, and a real run over HTTP.

Speed is not asserted (the machine is shared); the structure, the arithmetic
linking ratio, limit and normalized overhead, and that every mode generated
tokens are. The arithmetic is checked on hand-made samples in ``make test``;
the end-to-end ``--quick`` run (two engines, about 4 minutes on 2 cores) is a
benchmark smoke test and runs with ``make test-slow``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest


def test_report_arithmetic_on_hand_made_samples(tmp_path):
    from distillgame.bench.overhead import BenchConfig, RequestSample, aggregate, build_report, markdown, write_report

    def stats(tokens: int, wall: float, tpot: float):
        return aggregate([wall], [RequestSample(ttft=0.1, tpot=tpot, tokens=tokens // 2)] * 2)

    # Teacher alone 100 tok/s, PoE 50, ADS 25; the proxy alone 400 tok/s: t_p/t_t = 0.25.
    # poe@vllm: the server whose proxy runs on vLLM's layers, against the same baseline (the teacher alone).
    teacher = {1: {"none": stats(100, 1.0, 0.01), "poe": stats(100, 2.0, 0.02), "ads": stats(100, 4.0, 0.04),
                   "none@vllm": stats(100, 1.25, 0.0125), "poe@vllm": stats(100, 1.5, 0.015)}}
    proxy = {1: {"none": stats(400, 1.0, 0.0025)}}
    report = build_report(teacher, proxy, BenchConfig.quick(), "distillgame bench overhead --quick")
    rows = {r["mode"]: r for r in report["results"]}
    assert rows["none"]["tok_per_s"] == 100.0 and rows["none"]["ratio"] == 1.0 and rows["none"]["limit"] == 1.0
    assert rows["poe"]["ratio"] == pytest.approx(2.0) and rows["ads"]["ratio"] == pytest.approx(4.0)
    assert rows["poe"]["tp_over_tt"] == pytest.approx(0.25)
    assert rows["poe"]["limit"] == pytest.approx(1.25) and rows["ads"]["limit"] == pytest.approx(1.5)
    assert rows["poe"]["ratio_over_limit"] == pytest.approx(1.6)
    assert rows["poe"]["normalized_overhead"] == pytest.approx(4.0)   # (2 - 1) / 0.25
    assert rows["ads"]["normalized_overhead"] == pytest.approx(12.0)  # (4 - 1) / 0.25
    assert rows["poe"]["tpot_ratio_p50"] == pytest.approx(2.0)
    assert rows["poe@vllm"]["runner"] == "vllm" and rows["poe"]["runner"] == "transformers"
    assert rows["poe@vllm"]["ratio"] == pytest.approx(1.5) and rows["poe@vllm"]["limit"] == pytest.approx(1.25)
    assert rows["none@vllm"]["ratio"] == pytest.approx(1.25) and rows["none@vllm"]["normalized_overhead"] is None
    assert report["proxy_alone"] == [{"concurrency": 1, **dataclasses.asdict(proxy[1]["none"])}]
    # Without the proxy run there is no floor to compare with.
    bare = {r["mode"]: r for r in build_report(teacher, None, BenchConfig.quick(), "x")["results"]}
    assert bare["poe"]["limit"] is None and "normalized_overhead" not in bare["poe"]
    md = markdown(report)
    assert "| poe | 1 | 50.0 |" in md and "| 2.00 | 1.25 | 1.60 | - | 4.00 (1.49) |" in md
    # Each request's line, in the order given: where a stall fell is read from these.
    logged = aggregate([1.0], [RequestSample(0.5, None, 1, start=2.0, round=1),
                               RequestSample(0.25, 0.0125, 9, start=2.5, round=1)], [10])
    assert logged.requests_log == [[1, 2.0, 0.5, None, 1], [1, 2.5, 0.25, 0.0125, 9]]
    assert logged.held_back == 0
    # A stream whose text came all at once after the first (64 tokens in 6 ms) was held back; a short one is not counted.
    burst = aggregate([1.0], [RequestSample(2.2, 0.0001, 64), RequestSample(0.1, 0.0001, 5),
                              RequestSample(0.1, 0.04, 64)], [133])
    assert burst.held_back == 1
    assert "| 0 / 2 |" in md and "held back" in md
    # Per round, paired with the baseline's same round: teacher 100 then 50 tok/s, PoE 50 then 40.
    two = {1: {"none": aggregate([1.0, 2.0], [RequestSample(0.1, 0.01, 50)] * 4, [100, 100]),
               "poe": aggregate([2.0, 2.5], [RequestSample(0.1, 0.02, 50)] * 4, [100, 100])}}
    paired = {r["mode"]: r for r in build_report(two, proxy, BenchConfig.quick(), "x")["results"]}
    assert paired["poe"]["round_ratios"] == pytest.approx([2.0, 1.25])
    # The floor is the run's: teacher 200 tokens in 3 s against the proxy's 400 tok/s, 1 + 1/6.
    assert paired["poe"]["limit"] == pytest.approx(7 / 6)
    assert paired["poe"]["round_ratio_over_limit"] == pytest.approx([2.0 * 6 / 7, 1.25 * 6 / 7])
    assert "| 1.07-1.71 |" in markdown({**report, "results": list(paired.values())})
    # With the proxy alone in the same two rounds (400 then 200 tok/s), each round has its own floor:
    # 1 + 100/400 and 1 + 50/200, both 1.25.
    same_rounds = {1: {"none": aggregate([1.0, 1.0], [RequestSample(0.1, 0.0025, 150)] * 4, [400, 200])}}
    own = {r["mode"]: r for r in build_report(two, same_rounds, BenchConfig.quick(), "x")["results"]}
    assert own["poe"]["round_ratio_over_limit"] == pytest.approx([2.0 / 1.25, 1.25 / 1.25])
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "overhead.json").read_text())["results"] == report["results"]
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plain_vllm_server_is_the_baseline_and_vllm_separate_turns_the_shared_trunk_off(tmp_path, tiny_pair):
    from distillgame.bench.overhead import (BenchConfig, RequestSample, aggregate, build_report, endpoints_of,
                                            plain_server_args, server_args)

    def stats(tokens: int, wall: float):
        return aggregate([wall], [RequestSample(ttft=0.1, tpot=0.01, tokens=tokens // 2)] * 2)

    teacher = {8: {"none@plain": stats(100, 1.0), "none@vllm": stats(100, 1.02), "poe@vllm": stats(100, 1.2),
                   "none@vllm-separate": stats(100, 1.3), "poe@vllm-separate": stats(100, 1.45)}}
    rows = {r["mode"]: r for r in build_report(teacher, None, BenchConfig.quick(), "x")["results"]}
    assert {r["base"] for r in rows.values()} == {"none@plain"}
    assert rows["none@vllm"]["ratio"] == pytest.approx(1.02) and rows["poe@vllm-separate"]["ratio"] == pytest.approx(1.45)
    assert rows["poe@vllm-separate"]["runner"] == "vllm-separate"
    assert list(endpoints_of("http://x", ["none", "poe"], "plain")) == ["none@plain"]

    cfg = BenchConfig.quick()
    cfg.teacher, cfg.proxy = map(str, tiny_pair)
    plain = plain_server_args(cfg)
    assert plain[plain.index("--model") + 1] == cfg.teacher
    assert "--additional-config" not in plain and "--hf-overrides" not in plain
    assert plain[plain.index("--kv-cache-memory-bytes") + 1] == str(int(cfg.kv_cache_gib * (1 << 30)))
    separate = server_args(cfg, tmp_path / "policy.toml", cfg.teacher, cfg.proxy, None, "vllm-separate")
    assert separate[separate.index("--proxy-runner") + 1] == "vllm" and "--no-shared-trunk" in separate
    assert "--no-shared-trunk" not in server_args(cfg, tmp_path / "policy.toml", cfg.teacher, cfg.proxy, None, "vllm")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overhead_quick_report(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "distillgame.cli", "bench", "overhead", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "overhead.json").read_text())
    assert (out / "overhead.md").read_text().startswith("# Defense overhead")
    assert (out / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["mode"], r["concurrency"]): r for r in report["results"]}
    # One server per proxy runner: the vllm runner's arms are MODE@vllm, against the same baseline.
    arms = ("none", "poe", "ads", "none@vllm", "poe@vllm", "ads@vllm")
    assert set(rows) == {(m, c) for m in arms for c in (1, 8)}
    assert [p["concurrency"] for p in report["proxy_alone"]] == [1, 8]
    for (arm, c), r in rows.items():
        mode = arm.split("@")[0]
        assert r["runner"] == ("vllm" if "@" in arm else "transformers")
        assert r["tokens"] > 0 and r["requests"] == max(2, c)
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert 0 < r["ttft_p50"] <= r["ttft_p99"]
        # Every request logged: [round, sent at, TTFT, TPOT, tokens], its tokens summing to the row's.
        log = r["requests_log"]
        assert len(log) == r["requests"] and sum(x[4] for x in log) == r["tokens"]
        assert all(x[0] == 0 and 0 < x[1] < r["wall_s"] * 20 and x[2] > 0 for x in log)
        base = rows[("none", c)]
        assert r["ratio"] == pytest.approx(base["tok_per_s"] / r["tok_per_s"])
        proxy = next(p for p in report["proxy_alone"] if p["concurrency"] == c)
        tp_tt = base["tok_per_s"] / proxy["tok_per_s"]
        assert r["limit"] == pytest.approx(1 + {"none": 0, "poe": 1, "ads": 2}[mode] * tp_tt)
        if arm == "none":
            assert r["ratio"] == pytest.approx(1.0)
        elif mode == "none":
            assert r["normalized_overhead"] is None
        else:
            assert r["normalized_overhead"] == pytest.approx((r["ratio"] - 1) / tp_tt)
            assert r["paper_normalized_overhead"] == {"poe": 1.49, "ads": 4.5}[mode]
    assert report["machine"]["cpus"] >= 1 and "bench overhead --quick" in report["command"]


def test_step_profile_takes_the_median_decode_step_of_each_part():
    from distillgame.bench.step_profile import parse_trace

    events = [
        {"name": "execute_context_4(256)_generation_0(0)", "cat": "user_annotation", "dur": 900_000},  # prefill
        *({"name": "execute_context_0(0)_generation_4(4)", "cat": "user_annotation", "dur": d}
          for d in (40_000, 50_000, 45_000)),
        *({"name": "distillgame.proxy_forward", "cat": "user_annotation", "dur": d} for d in (10_000, 300_000, 12_000)),
        {"name": "nn.Module: Sampler_0", "cat": "python_function", "dur": 9_000},
        {"name": "aten::mm", "cat": "cpu_op", "dur": 5},
    ]
    parts = parse_trace(events)
    assert parts == {"model_step": pytest.approx(0.045), "distillgame.proxy_forward": pytest.approx(0.012),
                     "sampler": pytest.approx(0.009)}
