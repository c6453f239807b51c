"""Does an early-exit proxy defend as well as a trained one? PoE on the zoo at matched teacher accuracy.

Compares two rows of the converged Table 1 protocol (``distillgame attack table``
on the zoo, task gsm-symbolic-easy, full fine-tuning at lr 2e-3 for 40 epochs,
1000 sampled traces, 500 greedy test problems):

- PoE with the zoo's trained student proxy (``bench/zoo/proxy``) at gamma 0.65,
  the committed row of the 40-epoch table, ``bench/results/table1_epochs40/table1.json``;
- PoE with an early exit of the teacher (``bench/zoo/proxy-exit2``: its first 2
  of 4 layers and a fitted read-out, from ``distillgame proxy``) at the gamma
  whose greedy teacher accuracy matches the first row's.

Reads what the table left behind and writes ``early_exit_proxy.json`` and
``early_exit_proxy.md``: the gammas tried (teacher accuracy on 500 test
problems, KL(released || teacher) per token over each gamma's 1000 sampled
training traces from the server's counters, argmax agreement, traces correct)
and both rows (teacher accuracy, KL, passive and filter-correct students,
mean ± standard error over seeds, time cost). Reproduce (the work folder of the
tables; the commands that filled it are stored in the JSON)::

    .venv/bin/python bench/studies/early_exit_proxy.py --work WORK --calibration exit2_cal.yaml \
        --table OUT/table1.json --out bench/results --finding "..."

Where the calibration's work folder is gone, ``--calibration`` takes the
committed ``early_exit_proxy.json`` instead and reuses its gammas.

(``docs/attack-harness.md`` has the table commands and ``exit2.yaml``.)

Not for: running anything (the table does) or choosing a gamma automatically.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "bench" / "results" / "table1_epochs40" / "table1.json"
REFERENCE_ROW = "poe-gamma0.65"
ATTACKERS = ("passive", "filter-correct")


def calibration(work: Path, config: Path) -> list[dict[str, Any]]:
    """Per gamma tried: teacher accuracy (greedy test) and the fidelity of its sampled training traces.

    ``config`` is the calibration's YAML (read from ``work``) or an earlier report's JSON (its rows reused)."""
    if config.suffix == ".json":
        return json.loads(config.read_text())["calibration"]
    out = []
    for s in yaml.safe_load(config.read_text())["settings"]:
        d = work / s["name"]
        test = json.loads((d / "teacher_test.jsonl.summary.json").read_text())
        traces = json.loads((d / "traces.jsonl.summary.json").read_text())
        fidelity = json.loads((d / "fidelity.json").read_text())
        p, n = test["accuracy"], test["n_records"]
        out.append({"setting": s["name"], "gamma": s["defense"]["gamma"], "proxy": Path(s["proxy"]).name,
                    "teacher_acc": {"mean": p, "sem": math.sqrt(p * (1 - p) / n), "n": n},
                    "kl_per_token": fidelity["kl_per_token"], "argmax_agreement": fidelity["argmax_agreement"],
                    "trace_tokens": fidelity["tokens"], "traces_correct": traces["accuracy"]})
    return sorted(out, key=lambda r: r["gamma"])


def row(table: dict[str, Any], name: str, proxy: str) -> dict[str, Any]:
    """One table row's teacher side and its passive and filter-correct students (every seed's accuracy in runs)."""
    r = next(r for r in table["rows"] if r["teacher"] == name)
    students = {a: {**{k: r["attackers"][a][k] for k in ("mean", "sem", "n", "dropped")}, "runs": r["runs"][a]}
                for a in ATTACKERS if a in r["attackers"]}
    return {"setting": name, "proxy": proxy, "gamma": r["defense"]["gamma"], "teacher_acc": r["teacher_acc"],
            "kl_per_token": r["fidelity"]["kl_per_token"], "argmax_agreement": r["fidelity"]["argmax_agreement"],
            "traces_correct": r["trace_accuracy"], "time_cost": r["time_cost"], **students}


def _pct(m: dict[str, Any]) -> str:
    return f"{100 * m['mean']:.1f}% ± {100 * m['sem']:.1f} (n={m['n']})"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# PoE with an early-exit proxy against the trained proxy, at matched teacher accuracy", "",
             "Gammas tried with `bench/zoo/proxy-exit2` (teacher accuracy: greedy, 500 test problems; KL per token "
             "over the 1000 sampled training traces):", "",
             "| gamma | teacher acc. | KL per token | argmax agreement | traces correct |",
             "| --- | --- | --- | --- | --- |"]
    for c in report["calibration"]:
        lines.append(f"| {c['gamma']:g} | {_pct(c['teacher_acc'])} | {c['kl_per_token']:.3f} | "
                     f"{100 * c['argmax_agreement']:.1f}% | {100 * c['traces_correct']:.1f}% |")
    lines += ["", "| proxy | gamma | teacher acc. | KL per token | passive | filter-correct (traces dropped) | "
              "time cost |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        fc = r.get("filter-correct")
        lines.append(f"| {r['proxy']} | {r['gamma']:g} | {_pct(r['teacher_acc'])} | {r['kl_per_token']:.3f} | "
                     f"{_pct(r['passive']) if 'passive' in r else '–'} | "
                     f"{_pct(fc) + ' (' + str(fc['dropped']) + ')' if fc else '–'} | {r['time_cost']:.2f}x |")
    lines += ["", "Students: mean ± standard error over seeds, each on 500 test problems. Teacher: one greedy pass, "
              "sem = sqrt(p(1-p)/n). Time cost: generation wall time over the undefended teacher's on the same "
              "server, 3 interleaved rounds of 64 prompts.", "", report["finding"], "", "Commands:", "",
              *(f"    {c}" for c in [*report["commands"]["runs"], report["commands"]["early_exit"]]), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the tables' work folder (collections)")
    ap.add_argument("--calibration", type=Path, required=True, help="the YAML of the gammas tried, or an earlier early_exit_proxy.json")
    ap.add_argument("--table", type=Path, required=True, help="table1.json of the early-exit row's table")
    ap.add_argument("--reference", type=Path, default=REFERENCE, help="table1.json with the trained proxy's row")
    ap.add_argument("--finding", default="", help="one paragraph: what the comparison shows")
    ap.add_argument("--run-command", action="append", default=[], help="a command that produced the inputs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    table, reference = json.loads(args.table.read_text()), json.loads(args.reference.read_text())
    trained = row(reference, REFERENCE_ROW, "proxy")
    report = {
        "calibration": calibration(args.work, args.calibration),
        "target_teacher_acc": trained["teacher_acc"],
        "rows": [trained, *(row(table, r["teacher"], "proxy-exit2") for r in table["rows"]
                            if r["defense"].get("mode") == "poe")],
        "partial": table.get("partial", False),
        "commands": {"reference": reference["command"], "early_exit": table["command"], "runs": args.run_command},
        "finding": args.finding,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_exit_proxy.json").write_text(json.dumps(report, indent=2))
    (args.out / "early_exit_proxy.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
