"""The tools users bring, against ``distillgame serve``'s defended default: vLLM's serving benchmark and lm-eval.

Starts ``distillgame serve`` on the embedded pair with two keys, one on the
default PoE tier (gamma 0.29) and one on a ``none`` tier, and runs

- vLLM's own serving benchmark (``vllm bench serve``, imported as
  ``vllm.benchmarks.serve`` because the CPU wheel's ``vllm`` script does not
  start): random dataset, streaming, completions and chat, at each concurrency,
  for each key, the two keys back to back in alternating order;
- EleutherAI's lm-evaluation-harness (``lm_eval --model local-completions``,
  from its own virtual environment: ``pip install "lm-eval[api]" transformers``, the
  latter for its tokenizer) on a local
  task file of GSM-Symbolic problems, with each key.

Writes ``user_tools.json`` and ``user_tools.md`` (the benchmark's numbers for
both tiers side by side, failed requests, and lm-eval's score)::

    .venv/bin/python bench/studies/user_tools.py --out bench/results \
        --lm-eval /tmp/lmeval/bin/lm_eval

Not for: the defense's overhead against a teacher alone (``bench overhead``,
which interleaves its arms round by round).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

POLICY = """
[tiers.default]
defense = { mode = "poe", gamma = 0.29 }
kl_budget = 0.25

[tiers.none]
defense = { mode = "none" }

[[keys]]
key = "sk-poe"
tier = "default"

[[keys]]
key = "sk-none"
tier = "none"
"""
KEYS = {"poe": "sk-poe", "none": "sk-none"}
BACKENDS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
SHOWN = ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "mean_tpot_ms")

TASK_YAML = """task: gsm_symbolic_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n\\n"]
  max_gen_toks: 160
  do_sample: false
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: '(-?[0-9]+(?:\\.[0-9]+)?)'
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def start_server(work: Path, port: int) -> subprocess.Popen:
    from distillgame.bench.load import start_server as start

    return start(work, port, POLICY, ["--max-num-seqs", "32", "--memory-share", "0.1", "--kv-cache-gib", "0.5"])


def vllm_bench(port: int, tier: str, endpoint: str, concurrency: int, prompts: int, tokenizer: str,
               model: str, work: Path, input_len: int, output_len: int) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its result JSON."""
    backend, path = BACKENDS[endpoint]
    name = f"{endpoint}-{tier}-c{concurrency}.json"
    argv = ["--backend", backend, "--base-url", f"http://127.0.0.1:{port}", "--endpoint", path,
            "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", "0",
            "--save-result", "--result-dir", str(work), "--result-filename", name, "--disable-tqdm"]
    code = ("import sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")
    env = dict(os.environ, OPENAI_API_KEY=KEYS[tier])
    run = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                         timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    result = json.loads((work / name).read_text())
    errors = [e for e in result.get("errors", []) if e]
    return {k: result.get(k) for k in SHOWN} | {"first_errors": errors[:3]}


def lm_eval(lm_eval_bin: str, port: int, model: str, tokenizer: str, work: Path, n: int,
            tier: str) -> dict[str, Any]:
    """lm-evaluation-harness's local-completions on a local GSM-Symbolic task (the last number of the
    answer against the reference), with ``tier``'s key."""
    from distillgame.tasks import build_prompt, load_problems

    task_dir = work / "lm_eval_task"
    task_dir.mkdir(exist_ok=True)
    data = task_dir / "test.jsonl"
    with data.open("w") as f:
        for p in load_problems("gsm-symbolic-easy", "test", n=n):
            f.write(json.dumps({"prompt": build_prompt(p, "gsm-symbolic-easy"), "answer": str(p.answer)}) + "\n")
    (task_dir / "task.yaml").write_text(TASK_YAML.format(data=data))
    args = [lm_eval_bin, "--model", "local-completions", "--tasks", "gsm_symbolic_easy_local",
            "--include_path", str(task_dir), "--output_path", str(work / f"lm_eval_out_{tier}"),
            "--model_args", f"model={model},base_url=http://127.0.0.1:{port}/v1/completions,"
                            f"tokenizer={tokenizer},num_concurrent=8,max_retries=1,tokenized_requests=False"]
    t0 = time.perf_counter()
    run = subprocess.run(args, env=dict(os.environ, OPENAI_API_KEY=KEYS[tier]), capture_output=True, text=True,
                         timeout=3600)
    out = {"tier": tier, "returncode": run.returncode, "wall_s": round(time.perf_counter() - t0, 1), "n": n,
           "command": " ".join(args[:1] + ["..."] + args[1:])}
    results = sorted((work / f"lm_eval_out_{tier}").rglob("results_*.json"))
    if run.returncode == 0 and results:
        task = json.loads(results[-1].read_text())["results"]["gsm_symbolic_easy_local"]
        out["exact_match"] = {k: v for k, v in task.items() if k.startswith("exact_match")}
    else:
        out["tail"] = (run.stdout + run.stderr)[-3000:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--prompts-per-concurrency", type=int, default=4, help="prompts per run = this x concurrency")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--lm-eval", default=None, help="the lm_eval executable (its own venv); omitted: skipped")
    p.add_argument("--lm-eval-n", type=int, default=50)
    p.add_argument("--port", type=int, default=8311)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from distillgame import models

    teacher, model = models.resolve(None, "teacher"), "smollm2-135m-instruct"
    out: dict[str, Any] = {"command": " ".join(["python bench/studies/user_tools.py", *(argv or sys.argv[1:])]),
                           "runs": []}
    with tempfile.TemporaryDirectory(prefix="user-tools-") as tmp:
        work = Path(tmp)
        server = start_server(work, args.port)
        try:
            for i, concurrency in enumerate(args.concurrency):
                for endpoint in BACKENDS:
                    tiers = ("none", "poe") if i % 2 == 0 else ("poe", "none")
                    for tier in tiers:
                        logger.info("vllm bench serve: %s, %s tier, concurrency %d", endpoint, tier, concurrency)
                        result = vllm_bench(args.port, tier, endpoint, concurrency,
                                            args.prompts_per_concurrency * concurrency, teacher, model, work,
                                            args.input_len, args.output_len)
                        out["runs"].append({"endpoint": endpoint, "tier": tier, "concurrency": concurrency,
                                            **result})
            if args.lm_eval:
                out["lm_eval"] = []
                for tier in ("none", "poe"):
                    logger.info("lm-eval local-completions on %d problems, %s tier", args.lm_eval_n, tier)
                    out["lm_eval"].append(lm_eval(args.lm_eval, args.port, model, teacher, work, args.lm_eval_n,
                                                  tier))
        finally:
            server.terminate()
            server.wait(timeout=120)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "user_tools.json").write_text(json.dumps(out, indent=2))
    (args.out / "user_tools.md").write_text(render(out))
    sys.stdout.write(render(out))
    ok = all(r["failed"] == 0 for r in out["runs"]) and all(e["returncode"] == 0 for e in out.get("lm_eval", []))
    return 0 if ok else 1


def render(out: dict[str, Any]) -> str:
    lines = ["# vLLM's serving benchmark and lm-eval against `distillgame serve`", "",
             "| endpoint | concurrency | tier | completed | failed | output tok/s | mean TTFT ms | mean TPOT ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["runs"]:
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['tier']} | {r['completed']} | {r['failed']} | "
                     f"{r['output_throughput']:.1f} | {r['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} |")
    for e in out.get("lm_eval", []):
        lines += ["", f"lm-eval (`local-completions`, {e['tier']} tier, {e['n']} GSM-Symbolic problems, greedy, the "
                      f"answer's last number): exit code {e['returncode']}, {e['wall_s']} s, exact match "
                      f"{e.get('exact_match')}"]
    lines += ["", f"Command: `{out['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
