"""Smoke test of ``distillgame bench overhead --quick``: a real server over HTTP, the report's shape.

Speed is not asserted (the machine is shared); the structure, the arithmetic
linking ratio, limit and normalized overhead, and that every mode generated
tokens are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
    assert set(rows) == {(m, c) for m in ("none", "poe", "ads") for c in (1, 8)}
    assert [p["concurrency"] for p in report["proxy_alone"]] == [1, 8]
    for (mode, c), r in rows.items():
        assert r["tokens"] > 0 and r["requests"] == max(2, c)
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert 0 < r["ttft_p50"] <= r["ttft_p99"]
        base = rows[("none", c)]
        assert r["ratio"] == pytest.approx(base["tok_per_s"] / r["tok_per_s"])
        proxy = next(p for p in report["proxy_alone"] if p["concurrency"] == c)
        tp_tt = base["tok_per_s"] / proxy["tok_per_s"]
        assert r["limit"] == pytest.approx(1 + {"none": 0, "poe": 1, "ads": 2}[mode] * tp_tt)
        if mode == "none":
            assert r["ratio"] == pytest.approx(1.0)
        else:
            assert r["normalized_overhead"] == pytest.approx((r["ratio"] - 1) / tp_tt)
            assert r["paper_normalized_overhead"] == {"poe": 1.49, "ads": 4.5}[mode]
    assert report["machine"]["cpus"] >= 1 and "bench overhead --quick" in report["command"]
