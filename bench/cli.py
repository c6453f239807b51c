"""``distillgame bench {overhead,calibrate,quality}``: the measurement commands.

Not for: the measurements themselves (see :mod:`distillgame.bench.overhead`,
:mod:`distillgame.bench.reference_hf`, :mod:`distillgame.bench.calibrate`,
:mod:`distillgame.bench.quality`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: defense overhead, reference approach, calibration, "
                                            "trace quality")
    sub = p.add_subparsers(dest="bench_command", required=True)

    o = sub.add_parser("overhead", help="defense overhead through the server vs its physical limit")
    o.add_argument("--quick", action="store_true", help="concurrency 1 and 8, 12 tokens, one round (smoke)")
    o.add_argument("--url", default=None, help="measure a running server (keys sk-bench-none/poe/ads) instead")
    o.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 8 32 (quick: 1 8)")
    o.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64)")
    o.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    o.add_argument("--requests-per-slot", type=int, default=None,
                   help="requests per round and arm = concurrency x this (default 2)")
    o.add_argument("--min-requests", type=int, default=None,
                   help="at least this many requests per round and arm (default 2; more steadies low concurrency)")
    o.add_argument("--gamma", type=float, default=0.65)
    o.add_argument("--lam", type=float, default=0.05)
    o.add_argument("--teacher", default=None)
    o.add_argument("--proxy", default=None)
    o.add_argument("--no-limit", action="store_true", help="skip serving the proxy alone")
    o.add_argument("--proxy-runners", default="transformers,vllm",
                   help="comma-separated: one server per runner, measured side by side (arms MODE@vllm): "
                        "transformers, vllm, vllm-separate (vllm without the shared trunk), plain (vLLM's own "
                        "server on the teacher, no defense: the baseline where present)")
    o.add_argument("--modes", default=",".join(("none", "poe", "ads")),
                   help="comma-separated tiers measured on each defended server")
    o.add_argument("--reference", action="store_true",
                   help="also time the reference approach (HF generate + proxy logits processor)")
    o.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    o.add_argument("--out", type=Path, default=RESULTS)
    o.set_defaults(func=_overhead)

    r = sub.add_parser("reference", help="our server vs HF generate with a proxy logits processor")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    r.add_argument("--workload", choices=["fixed", "traces", "both"], default="both")
    r.add_argument("--max-tokens", type=int, default=64, help="fixed-length workload's output length")
    r.add_argument("--gamma", type=float, default=0.65)
    r.add_argument("--cap", type=int, default=800,
                   help="cap on the teacher trace lengths (tokens; prompt + cap must fit max_model_len 1024)")
    r.add_argument("--skip-none", action="store_true", help="skip our undefended row (saves time)")
    r.add_argument("--proxy-runners", default="transformers,vllm",
                   help="comma-separated: our server once per proxy runner, interleaved with the reference")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="model dtype on both sides (server and HF reference)")
    r.add_argument("--reuse-reference", type=Path, default=None, metavar="JSON",
                   help="take the requests (trace lengths) and the HF reference's results from an earlier "
                        "reference.json and time only our server (the reference code does not change with ours)")
    r.add_argument("--note", default="")
    r.add_argument("--out", type=Path, default=RESULTS)
    r.set_defaults(func=_reference)

    c = sub.add_parser("calibrate", help="find gamma (PoE) or lam (ADS) whose mean KL(released||teacher) is eps")
    c.add_argument("--mode", choices=["poe", "ads"], required=True)
    c.add_argument("--target-kl", type=float, required=True, help="budget eps in nats per token")
    c.add_argument("--policy", type=Path, default=None, help="policy file to write the parameter into")
    c.add_argument("--tier", default=None, help="tier of --policy to update")
    c.add_argument("--teacher", default=None)
    c.add_argument("--proxy", default=None)
    c.add_argument("--ads-grad", default=None)
    c.add_argument("--calib", type=int, default=32, help="calibration prompts")
    c.add_argument("--holdout", type=int, default=32, help="held-out validation prompts")
    c.add_argument("--tokens", type=int, default=48, help="positions per prompt")
    c.add_argument("--task", default="gsm-symbolic", help="task whose test prompts are used")
    c.add_argument("--prompt-format", choices=["chat", "plain"], default="chat",
                   help="chat template (instruct models) or the task's plain prompt (base models, the zoo)")
    c.add_argument("--tol", type=float, default=0.01, help="relative tolerance of the bisection")
    c.add_argument("--store", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored per-position log-probs (float16 halves the memory of large runs)")
    c.add_argument("--out", type=Path, default=RESULTS)
    c.set_defaults(func=_calibrate)

    q = sub.add_parser("quality", help="released-trace quality per defense: accuracy, length, teacher perplexity, "
                                       "repetition, rubric judge")
    q.add_argument("--quick", action="store_true", help="4 prompts per setting, 96 tokens, none and PoE (smoke)")
    q.add_argument("--settings", default=None,
                   help='teacher settings (default "none;poe:gamma=0.65;ads:lam=2.04,eps=1e-4", ADS at the KL of '
                        'PoE 0.65 on the zoo; quick: "none;poe:gamma=0.65"); ADS without --ads-grad computes a '
                        'gradient from the task')
    q.add_argument("--n", type=int, default=None, help="test prompts per setting (default 40; quick 4)")
    q.add_argument("--max-tokens", type=int, default=None, help="trace length cap (default 256; quick 96)")
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0, help="per-request sampling seed = seed + problem index")
    q.add_argument("--task", default="gsm-symbolic-easy")
    q.add_argument("--split", default="test")
    q.add_argument("--teacher", default=None, help="teacher folder, also scores perplexity (default: the zoo "
                                                   "teacher; 'default': the embedded one)")
    q.add_argument("--proxy", default=None, help="proxy folder (default: the zoo proxy; 'default': embedded)")
    q.add_argument("--ads-grad", default=None)
    q.add_argument("--base-url", default=None, help="a running endpoint (.../v1) instead of starting a server")
    q.add_argument("--api-key", action="append", default=[], metavar="SETTING=KEY",
                   help="with --base-url: the key whose tier is that setting (repeat per setting)")
    q.add_argument("--model", default=None, help="with --base-url: model id (default: the first listed)")
    q.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible judge endpoint (.../v1); 'self': the server this run starts "
                        "(tests the mechanism, scores meaningless); omitted: no judge")
    q.add_argument("--judge-model", default=None, help="default: the judge endpoint's first model")
    q.add_argument("--judge-key", default=None, help="default: $DISTILLGAME_JUDGE_KEY, then $OPENAI_API_KEY")
    q.add_argument("--judge-api", choices=["chat", "completions"], default="chat")
    q.add_argument("--judge-max-tokens", type=int, default=16)
    q.add_argument("--concurrency", type=int, default=8)
    q.add_argument("--work", type=Path, default=None, help="traces and server log (default: a temp folder)")
    q.add_argument("--note", default="")
    q.add_argument("--out", type=Path, default=RESULTS)
    q.set_defaults(func=_quality)


def _command() -> str:
    return "distillgame " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("distillgame") \
        else shlex.join(["distillgame", *sys.argv[1:]])


def _quiet() -> None:
    # One log line per HTTP request would drown the progress bar.
    for name in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _overhead(args: argparse.Namespace) -> int:
    _quiet()
    from distillgame.bench.overhead import MODES, RUNNERS, BenchConfig, run_overhead

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.concurrency:
        cfg.concurrencies = args.concurrency
    if args.max_tokens:
        cfg.max_tokens = args.max_tokens
    if args.rounds:
        cfg.rounds = args.rounds
    if args.requests_per_slot:
        cfg.requests_per_slot = args.requests_per_slot
    if args.min_requests:
        cfg.min_requests = args.min_requests
    cfg.gamma, cfg.lam, cfg.teacher, cfg.proxy = args.gamma, args.lam, args.teacher, args.proxy
    cfg.limit = not args.no_limit
    cfg.proxy_runners = [r for r in args.proxy_runners.split(",") if r]
    cfg.modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(cfg.proxy_runners) - set(RUNNERS)) + sorted(set(cfg.modes) - set(MODES))
    if bad:
        raise SystemExit(f"unknown runner or mode {bad}; runners: {list(RUNNERS)}, modes: {list(MODES)}")
    report = run_overhead(cfg, args.out, url=args.url, command=_command(), note=args.note)
    from distillgame.bench.overhead import markdown

    print(markdown(report))
    return 0


def _reference(args: argparse.Namespace) -> int:
    from distillgame.bench.reference_hf import run_reference

    _quiet()

    report = run_reference(args, command=_command())
    print(report["markdown"])
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from distillgame.bench.calibrate import run_calibrate

    result = run_calibrate(args, command=_command())
    print(result["summary"])
    return 0 if result["within_tolerance"] else 1


def _quality(args: argparse.Namespace) -> int:
    _quiet()
    from distillgame.bench.quality import QualityConfig, markdown, run_quality
    from distillgame.clients.attack.table import parse_settings

    cfg = QualityConfig.quick() if args.quick else QualityConfig()
    if args.settings:
        cfg.settings = parse_settings(args.settings)
    if args.n:
        cfg.n = args.n
    if args.max_tokens:
        cfg.max_tokens = args.max_tokens
    for name in ("teacher", "proxy"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, None if value == "default" else value)
    cfg.temperature, cfg.seed, cfg.task, cfg.split = args.temperature, args.seed, args.task, args.split
    cfg.ads_grad, cfg.base_url, cfg.model, cfg.concurrency = args.ads_grad, args.base_url, args.model, args.concurrency
    cfg.api_keys = dict(kv.split("=", 1) for kv in args.api_key)
    cfg.judge_url, cfg.judge_model, cfg.judge_key = args.judge_url, args.judge_model, args.judge_key
    cfg.judge_api, cfg.judge_max_tokens = args.judge_api, args.judge_max_tokens
    report = run_quality(cfg, args.out, command=_command(), note=args.note, workdir=args.work)
    print(markdown(report))
    return 0
