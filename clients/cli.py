"""``distillgame attack {collect,distill,values,eval,table}``: the attack harness's commands.

Heavy imports (torch, openai, vLLM) happen inside the handlers, so ``--help``
stays fast and other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    attack = subparsers.add_parser("attack", help="collect traces from an endpoint and distill students from them")
    sub = attack.add_subparsers(dest="attack_command", required=True)

    c = sub.add_parser("collect", help="query an OpenAI-compatible endpoint for a task split (resumable JSONL)")
    _endpoint_args(c)
    c.add_argument("--task", default="gsm-symbolic")
    c.add_argument("--split", default="train")
    c.add_argument("--n", type=int, default=None)
    c.add_argument("--out", type=Path, required=True, help="trace JSONL (appended to; reruns resume)")
    c.add_argument("--api", choices=["completions", "chat"], default="completions")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None, help="per-request sampling seed = seed + problem index")
    c.add_argument("--concurrency", type=int, default=8)
    c.add_argument("--max-retries", type=int, default=6)
    c.add_argument("--data-dir", default=None, help="local dataset folder for gsm8k/math")
    c.add_argument("--extra-body", default=None, help="JSON object sent as extra request fields")
    c.set_defaults(func=_collect)

    d = sub.add_parser("distill", help="LoRA-distill a student from traces, passive or adaptive")
    d.add_argument("--traces", type=Path, required=True)
    d.add_argument("--student", required=True, help="transformers causal LM folder or id")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--mode", choices=["passive", "adaptive"], default="passive")
    d.add_argument("--eta", type=float, default=None, help="fixed tilt sharpness (default: from --rho)")
    d.add_argument("--rho", type=float, default=0.1, help="KL(w || uniform) budget per minibatch")
    d.add_argument("--value-norm", choices=["sum", "mean"], default="sum",
                   help="v from the summed log p(y|x) (eq. 3) or its per-token mean (the training loss)")
    d.add_argument("--placebo", action="store_true",
                   help="control: shuffle the values (minibatch: within each minibatch; released: over the whole "
                        "set), same weight spread, no information")
    _released_args(d)
    d.add_argument("--val-every", type=int, default=1, help="optimizer steps between grad L_val estimates")
    d.add_argument("--rank", type=int, default=128)
    d.add_argument("--lora-alpha", type=int, default=None)
    d.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (--rank is then unused)")
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--epochs", type=float, default=3.0)
    d.add_argument("--batch-size", type=int, default=6)
    d.add_argument("--grad-accum", type=int, default=4)
    d.add_argument("--max-length", type=int, default=2048)
    d.add_argument("--max-steps", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="float32")
    d.add_argument("--device", default="cpu")
    d.add_argument("--vmap-chunk", type=int, default=None)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--val-acc-task", default=None,
                   help="after every epoch: greedy accuracy on this task's --val-acc-split (the learning curve)")
    d.add_argument("--val-acc-split", default="holdout", help="never test (default: holdout)")
    d.add_argument("--val-acc-n", type=int, default=200)
    d.set_defaults(func=_distill)

    v = sub.add_parser("values", help="the released protocol's per-trace values and weights at theta_0 (JSONL)")
    v.add_argument("--traces", type=Path, required=True)
    v.add_argument("--student", required=True, help="transformers causal LM folder or id")
    v.add_argument("--out", type=Path, required=True, help='values JSONL: {"id", "value", "weight"} per trace')
    _released_args(v, weighting_choices=["released"])
    v.add_argument("--rank", type=int, default=128)
    v.add_argument("--lora-alpha", type=int, default=None)
    v.add_argument("--batch-size", type=int, default=6)
    v.add_argument("--max-length", type=int, default=2048)
    v.add_argument("--seed", type=int, default=0, help="seeds the LoRA initialization theta_0")
    v.add_argument("--dtype", default="float32")
    v.add_argument("--device", default="cpu")
    v.add_argument("--placebo", action="store_true", help="shuffle the weights over the set (a control)")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    v.set_defaults(func=_values)

    e = sub.add_parser("eval", help="student accuracy (local vLLM) or teacher accuracy (through its endpoint)")
    e.add_argument("--student", default=None, help="student folder (e.g. DISTILL_OUT/merged)")
    _endpoint_args(e, required=False)
    e.add_argument("--task", default="gsm-symbolic")
    e.add_argument("--split", default="test")
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--max-tokens", type=int, default=512)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=_eval)

    t = sub.add_parser("table", help="the whole protocol: Table 1 (and --sweep: the frontier PNG)")
    t.add_argument("--config", type=Path, default=None, help="YAML/JSON TableConfig (flags override it)")
    t.add_argument("--out", type=Path, required=True, help="folder for table1.md/json/png and frontier.png")
    t.add_argument("--work", type=Path, default=None, help="traces, students, evaluations (default: OUT/runs)")
    t.add_argument("--teacher", default=None, help='teacher folder (default: bench/zoo/teacher; "default": embedded)')
    t.add_argument("--proxy", default=None, help='proxy folder (default: bench/zoo/proxy; "default": embedded)')
    t.add_argument("--ads-grad", default=None, help="proxy gradient file for the server's ADS tiers")
    t.add_argument("--student", default=None)
    t.add_argument("--task", default=None)
    t.add_argument("--seeds", type=int, default=None)
    t.add_argument("--n-train", type=int, default=None)
    t.add_argument("--n-test", type=int, default=None)
    t.add_argument("--n-val", type=int, default=None)
    t.add_argument("--max-tokens", type=int, default=None)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--rank", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--grad-accum", type=int, default=None)
    t.add_argument("--max-length", type=int, default=None)
    t.add_argument("--rho", type=float, default=None)
    t.add_argument("--val-every", type=int, default=None, help="optimizer steps between grad L_val estimates")
    t.add_argument("--workers", type=int, default=None, help="students trained at once, one process each")
    t.add_argument("--settings", default=None,
                   help='teacher settings, e.g. "none;poe:gamma=0.65;ads:lam=0.05,eps=1e-4"')
    t.add_argument("--attackers", default=None,
                   help="comma-separated attackers (default: passive,adaptive-minibatch,adaptive-released,"
                        "filter-correct,filter-degenerate; also: adaptive-released-neg; passive is always run)")
    t.add_argument("--placebo", action="store_true", help="also the placebo control (shuffled minibatch values)")
    t.add_argument("--beta", type=float, default=None, help="released protocol: w = exp(beta clip(a)) / mean")
    t.add_argument("--fd-eps", type=float, default=None, help="released protocol: central-difference step")
    t.add_argument("--clip", type=float, default=None, help="released protocol: clip of a")
    t.add_argument("--n-val-traces", type=int, default=None,
                   help="undefended teacher traces on the validation split for the released protocol's L_val")
    t.add_argument("--timing-rounds", type=int, default=None,
                   help="time cost: interleaved rounds of the same training prompts per setting (default 3)")
    t.add_argument("--timing-prompts", type=int, default=None, help="time cost: prompts per setting and round (default 64)")
    t.add_argument("--sweep", action="store_true", help="also sweep gamma/lam and draw the frontier PNG")
    t.add_argument("--full", action="store_true", help="full fine-tuning of the student (the default)")
    t.add_argument("--lora", action="store_true", help="LoRA (--rank) instead of full fine-tuning")
    t.add_argument("--val-acc-n", type=int, default=None,
                   help="per-epoch greedy validation accuracy on this many holdout problems (0: off; default 200)")
    t.add_argument("--sweep-seeds", type=int, default=None, help="seeds per frontier point beyond Table 1's (default 2)")
    t.add_argument("--partial", action="store_true",
                   help="train nothing: write the table from the cells already finished (labelled partial)")
    t.add_argument("--collect-only", action="store_true",
                   help="stop after the collections and the timing (the stages that need the server)")
    t.add_argument("--base-url", default=None, help="attack a running server instead of starting one")
    t.set_defaults(func=_table)


def _released_args(p: argparse.ArgumentParser, weighting_choices: list[str] | None = None) -> None:
    """Flags shared by ``distill`` and ``values``: weighting protocol, its numbers, filters, L_val."""
    choices = weighting_choices or ["minibatch", "released"]
    p.add_argument("--weighting", choices=choices, default=choices[0],
                   help="adaptive weights: minibatch (eq. 3 at the current theta, tilt per minibatch) or released "
                        "(the authors' code: fixed weights exp(beta clip(a)) from theta_0 over the whole set)")
    p.add_argument("--beta", type=float, default=0.5, help="released: w = exp(beta clip(a)) / mean")
    p.add_argument("--beta-rho", type=float, default=None,
                   help="released variant: beta set so that KL(w || uniform) over the whole set = this budget")
    p.add_argument("--fd-eps", type=float, default=0.01, help="released: central-difference step along g")
    p.add_argument("--clip", type=float, default=10.0, help="released: a is clipped to [-clip, clip]")
    p.add_argument("--value-sign", type=int, choices=[1, -1], default=1,
                   help="+1: each protocol's own sign (eq. 3's v; the released a); -1 negates the value")
    p.add_argument("--value-dtype", default="float64", help="released: dtype of g and the perturbed copies")
    p.add_argument("--filter", action="append", choices=["degenerate", "correct"], default=[], dest="filters",
                   help="drop traces first (repeatable): degenerate (foreign script / a token 8x in a row) or "
                        "correct (keep only right final answers)")
    p.add_argument("--val-traces", type=Path, default=None,
                   help="traces JSONL defining L_val (e.g. the undefended teacher on a holdout split)")
    p.add_argument("--val-task", default=None, help="else: task whose ground-truth solutions define L_val")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--val-n", type=int, default=32)


def _endpoint_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--base-url", required=required, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default=None, help="model id (default: the endpoint's first /v1/models entry)")


def _quiet_http() -> None:
    # One INFO line per request from the SDK's HTTP client drowns the progress bar.
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _model_id(base_url: str, api_key: str, model: str | None) -> str:
    if model:
        return model
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data[0].id


def _collect(args: argparse.Namespace) -> int:
    from distillgame.clients.attack.collect import CollectConfig, collect

    _quiet_http()
    cfg = CollectConfig(
        base_url=args.base_url, api_key=args.api_key, model=_model_id(args.base_url, args.api_key, args.model),
        task=args.task, split=args.split, n=args.n, out=args.out, api=args.api, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, concurrency=args.concurrency,
        max_retries=args.max_retries, data_dir=args.data_dir,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
    )
    summary = collect(cfg)
    log.info("collected %d/%d records (accuracy %s) in %.1fs", summary["n_records"], summary["n_problems"],
             summary["accuracy"], summary["wall_s_this_run"])
    return 0 if not summary["failures"] else 1


def _distill(args: argparse.Namespace) -> int:
    import torch

    from distillgame.clients.attack.distill import DistillConfig, distill

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistillConfig(
        student=args.student, out=args.out, mode=args.mode, eta=args.eta, rho=args.rho, val_every=args.val_every,
        rank=args.rank, lora_alpha=args.lora_alpha, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, max_steps=args.max_steps, seed=args.seed,
        dtype=args.dtype, device=args.device, vmap_chunk=args.vmap_chunk, value_norm=args.value_norm,
        placebo=args.placebo, weighting=args.weighting, beta=args.beta, beta_rho=args.beta_rho, fd_eps=args.fd_eps, clip=args.clip,
        value_sign=args.value_sign, value_dtype=args.value_dtype, filters=args.filters, lora=not args.full,
        val_acc_task=args.val_acc_task, val_acc_split=args.val_acc_split, val_acc_n=args.val_acc_n,
    )
    summary = distill(cfg, args.traces, val_task=args.val_task, val_split=args.val_split, val_n=args.val_n,
                      val_traces=args.val_traces)
    log.info("distilled %s student: %d steps, final loss %.4f, dropped %s -> %s", args.mode, summary["steps"],
             summary["final_loss"], summary["dropped"], args.out)
    return 0


def _values(args: argparse.Namespace) -> int:
    import torch

    from distillgame.clients.attack.distill import DistillConfig, values

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistillConfig(
        student=args.student, out=args.out.parent, mode="adaptive", weighting=args.weighting, rank=args.rank,
        lora_alpha=args.lora_alpha, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        dtype=args.dtype, device=args.device, beta=args.beta, beta_rho=args.beta_rho, fd_eps=args.fd_eps, clip=args.clip,
        value_sign=args.value_sign, value_dtype=args.value_dtype, filters=args.filters, placebo=args.placebo,
    )
    stats = values(cfg, args.traces, args.out, val_traces=args.val_traces, val_task=args.val_task,
                   val_split=args.val_split, val_n=args.val_n)
    log.info("values of %d traces -> %s: %s", stats["n"], args.out, stats)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from distillgame.clients.attack.evaluation import student_accuracy, teacher_accuracy

    _quiet_http()
    if (args.student is None) == (args.base_url is None):
        log.error("give exactly one of --student (a model folder) or --base-url (an endpoint)")
        return 2
    if args.student:
        summary = student_accuracy(args.student, args.task, args.split, args.n, args.out, max_tokens=args.max_tokens)
    else:
        summary = teacher_accuracy(
            args.base_url, _model_id(args.base_url, args.api_key, args.model), args.task, args.split, args.n,
            args.out / "teacher.jsonl", api_key=args.api_key, max_tokens=args.max_tokens,
        )
    log.info("accuracy %.4f", summary["accuracy"])
    return 0


def _table(args: argparse.Namespace) -> int:
    from distillgame.clients.attack.table import TableConfig, run_table

    _quiet_http()
    cfg = TableConfig.from_args(args)
    result = run_table(cfg)
    if cfg.collect_only:
        log.info("collected %s", result["collected"])
        return 0
    log.info("Table 1 written to %s", result["markdown"])
    return 0
