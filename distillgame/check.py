"""``distillgame check --gpu``: the acceptance check a provider runs before trusting a vLLM version on GPUs.

Runs, on a machine with CUDA and vLLM's CUDA wheel:
- the engine equivalence tests (PoE and ADS token for token against the
  float64 oracle, preemption, staggered arrivals; PoE with the proxy on
  vLLM's layers and on transformers) and the fail-closed tests,
  with vLLM's GPU defaults (chunked prefill on; async scheduling is what the
  defended engine turns off and the tests assert);
- the host-sync tests (``tests/test_host_syncs.py``): the defended step, in
  the processor alone and in an engine with the defense's ``sync_audit`` on,
  runs under ``torch.cuda.set_sync_debug_mode("error")``, so one
  synchronizing call (``.item()``, a blocking copy, ...) fails it;
- a short ``bench overhead`` at concurrency 1 and 32 on the embedded pair.
Prints one summary line per check and exits non-zero if any failed. Sized to
finish in about 10 minutes on one GPU.

``--runners-only`` checks the part of the defense that needs only torch and
transformers, for a GPU machine without vLLM's CUDA wheel: the proxy runners
(PoE and forward-mode ADS) against float64 on the GPU, in fp32 and bf16, each
step under ``set_sync_debug_mode("error")`` (``tests/test_runners_on_device.py``),
the mixing math (``tests/test_mixing.py``), and a short
``bench.runner_step`` (decode-step times of the runners alone). Without vLLM
and without that flag the check refuses to run rather than pass on less.
Runs as ``python -m distillgame.check`` too, where the rest of the command
line's dependencies (the server's) are not installed.

Not for: CPU machines (``make test`` is their check) or timing claims (the
overhead run here is a smoke-sized sample; ``distillgame bench overhead`` is
the measurement).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TESTS = ("tests/test_poe_engine.py", "tests/test_paged_proxy.py", "tests/test_ads.py", "tests/test_fail_closed.py")
SYNC_TESTS = ("tests/test_host_syncs.py",)
RUNNER_TESTS = ("tests/test_runners_on_device.py", "tests/test_mixing.py")
# The line tests/test_host_syncs.py prints for the engine's audit (see sync_line).
SYNC_LINE = "host syncs: engine"


@dataclass
class Outcome:
    name: str
    ok: bool
    summary: str
    seconds: float

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name:<22} {self.seconds:6.0f} s  {self.summary}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="acceptance checks of the defense on this machine's accelerator")
    p.add_argument("--gpu", action="store_true", required=True, help="run the GPU acceptance check")
    p.add_argument("--skip-bench", action="store_true", help="only the engine tests")
    p.add_argument("--runners-only", action="store_true",
                   help="only what needs no vLLM: the proxy runners and the mixing math on the GPU")
    p.add_argument("--out", type=Path, default=None, help="folder for the runner benchmark's results (with "
                                                           "--runners-only; default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds for the engine tests")
    p.set_defaults(func=run)


def sync_line(report: dict) -> str:
    """One line for the engine's sync audit report (``distillgame_sync_audit``); the check's summary quotes it."""
    return (f"{SYNC_LINE}: {report['host_reads']} host reads, {report['host_builds']} unstaged host builds, "
            f"{report['staged_copies']} staged copies in {report['steps']} defended steps "
            f"(sync debug mode: {report['sync_debug_mode'] or 'none, CPU'})")


def _pytest(name: str, files: tuple[str, ...], timeout: float, extra: tuple[str, ...] = ()) -> tuple[Outcome, str]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(name, False, f"timed out after {timeout:.0f} s", time.perf_counter() - start), ""
    tail = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:] + proc.stderr[-3000:])
    summary = tail[-1].strip("= ") if tail else f"pytest exit {proc.returncode}"
    return Outcome(name, proc.returncode == 0, summary, time.perf_counter() - start), proc.stdout


def _host_syncs(timeout: float) -> Outcome:
    outcome, stdout = _pytest("host syncs", SYNC_TESTS, timeout, ("-s",))
    lines = [line for line in stdout.splitlines() if line.startswith(SYNC_LINE)]
    if lines:
        outcome.summary += "; " + lines[-1][len(SYNC_LINE) + 2 :]
    return outcome


def _overhead(out: Path) -> Outcome:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "distillgame.cli", "bench", "overhead", "--concurrency", "1", "32",
           "--rounds", "1", "--max-tokens", "32", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return Outcome("bench overhead", False, f"exit {proc.returncode}", seconds)
    rows = json.loads((out / "overhead.json").read_text())["results"]
    parts = [f"{r['mode']}@{r['concurrency']} {r['tok_per_s']:.0f} tok/s x{r['ratio']:.2f}" for r in rows
             if r["mode"] != "none"]
    return Outcome("bench overhead", True, "; ".join(parts), seconds)


def _runner_step(out: Path) -> Outcome:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "distillgame.bench.runner_step", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return Outcome("runner step", False, f"exit {proc.returncode}", seconds)
    print(proc.stdout)
    rows = json.loads((out / "runner_step.json").read_text())["rows"]
    parts = [f"b{r['batch']} PoE {r['poe_ms']:.2f} / ADS {r['ads_ms']:.2f} / teacher {r['teacher_eager_ms']:.2f} ms"
             for r in rows]
    return Outcome("runner step", True, "; ".join(parts), seconds)


def _runner_outcomes(args: argparse.Namespace) -> list[Outcome]:
    outcome, stdout = _pytest("runner tests", RUNNER_TESTS, args.timeout, ("-s",))
    found = [line for line in stdout.splitlines() if line.startswith(("PoE runner on cuda", "ADS runner on cuda",
                                                                      "bf16 on cuda"))]
    if found:
        outcome.summary += "; " + "; ".join(found)
    outcomes = [outcome]
    if not args.skip_bench:
        if args.out is not None:
            outcomes.append(_runner_step(args.out))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                outcomes.append(_runner_step(Path(tmp)))
    return outcomes


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        logger.error("no CUDA device: `distillgame check --gpu` needs a GPU (on CPUs, `make test` is the check)")
        return 2
    if args.runners_only:
        outcomes = _runner_outcomes(args)
    elif not _has_vllm():
        logger.error("vLLM is not installed: the engine tests need its CUDA wheel (`make install` on this "
                     "machine); `--runners-only` checks the parts that need only torch")
        return 2
    else:
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        outcomes = [_pytest("engine tests", ENGINE_TESTS, args.timeout)[0], _host_syncs(args.timeout)]
        if not args.skip_bench:
            with tempfile.TemporaryDirectory() as tmp:
                outcomes.append(_overhead(Path(tmp)))
    print(f"distillgame GPU check on {torch.cuda.get_device_name(0)}")
    for outcome in outcomes:
        print(outcome.line())
    return 0 if all(o.ok for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillgame.check")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
