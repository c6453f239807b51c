"""``distillgame proxy``: an early-exit ("tuned lens") PoE proxy for any teacher folder.

The proxy is the teacher's first ``K`` decoder layers and a fitted linear
read-out (:func:`distillgame.models.build_lens_proxy`, the recipe of the
embedded proxy), stored in the teacher's own dtype so that its layers stay
byte-identical to the teacher's and the engine can run it on the teacher's
trunk. After building, the command measures the proxy on held-out teacher
samples (other questions and another seed than the fit) and adds the numbers
to ``distillgame_proxy.json`` in the folder:

* teacher and proxy NLL per token on the teacher's own sampled tokens, and
  how often the proxy's argmax is the teacher's;
* KL(teacher || proxy) per token;
* the PoE weight ``gamma`` (eq. 5) at which the mix spends the default
  fidelity budget (mean KL(released || teacher) = ``DEFAULT_KL_BUDGET``),
  bisected on those positions with ``distillgame bench calibrate``'s own
  mixing and KL.

Not for: proxies that are trained students (the zoo's ``bench/zoo/proxy``), or
calibrating a serving policy on a task (``distillgame bench calibrate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from distillgame import models

logger = logging.getLogger(__name__)

# Held-out measurement: questions of the task's holdout split (the fit sees
# train questions), sampled with the fit's seed plus this offset.
HOLDOUT_PROMPTS = 16
HOLDOUT_SEED_OFFSET = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "proxy", help="build an early-exit (tuned lens) PoE proxy from a teacher's first K layers and measure it"
    )
    p.add_argument("--teacher", required=True, help="teacher folder (Hugging Face layout), or 'default'")
    p.add_argument("--layer", type=int, required=True, help="exit after this many decoder layers (1..layers-1)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the proxy to (must not exist yet)")
    p.add_argument("--prompts", type=int, default=models.LENS_GSM_PROMPTS,
                   help=f"task questions the lens is fitted on, besides {len(models.LENS_GENERAL_PROMPTS)} "
                        "general requests")
    p.add_argument("--tokens", type=int, default=models.LENS_TOKENS, help="teacher-sampled tokens per prompt")
    p.add_argument("--seed", type=int, default=models.LENS_SEED, help="sampling seed of the fit")
    p.add_argument("--holdout", type=int, default=HOLDOUT_PROMPTS, help="held-out questions the proxy is measured on")
    p.add_argument("--task", default="gsm-symbolic", help="where the questions come from (distillgame.tasks)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="storage dtype; auto keeps the teacher's, so the engine can share its trunk")
    p.set_defaults(func=_run)


def build_proxy(teacher: Path, layer: int, out: Path, *, prompts: int = models.LENS_GSM_PROMPTS,
                tokens: int = models.LENS_TOKENS, seed: int = models.LENS_SEED, holdout: int = HOLDOUT_PROMPTS,
                task: str = "gsm-symbolic", dtype: str = "auto") -> dict[str, Any]:
    """Build the proxy into ``out``, measure it, and return (and save) its ``distillgame_proxy.json``."""
    from transformers import AutoTokenizer

    teacher, out = Path(teacher), Path(out)
    models.check_exit_layer(teacher, layer)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    models._atomic_save(lambda tmp: models.build_lens_proxy(
        teacher, tmp, layer, gsm_prompts=prompts, new_tokens=tokens, seed=seed, task=task, dtype=dtype), out)

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    held_out = models.lens_prompts(tokenizer, holdout, split="holdout", general=(), task=task)
    quality = proxy_quality(teacher, out, held_out, tokens, seed + HOLDOUT_SEED_OFFSET)
    meta = json.loads((out / "distillgame_proxy.json").read_text())
    meta.update({
        "command": (f"distillgame proxy --teacher {teacher} --layer {layer} --out {out} --prompts {prompts} "
                    f"--tokens {tokens} --seed {seed} --holdout {holdout} --task {task} --dtype {dtype}"),
        "dtype": str(models.stored_dtype(out)).removeprefix("torch."),
        "prompt_format": "chat" if getattr(tokenizer, "chat_template", None) else "plain",
        "task": task,
        "quality": quality,
    })
    (out / "distillgame_proxy.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def proxy_quality(teacher: Path, proxy: Path, prompts: list[list[int]], tokens: int, seed: int,
                  budget: float = models.DEFAULT_KL_BUDGET, chunk: int = 256) -> dict[str, Any]:
    """How close ``proxy`` is to ``teacher`` on the teacher's own samples after ``prompts`` (nats per token)."""
    import torch
    from transformers import AutoTokenizer

    from distillgame.bench.calibrate import bisect, mean_kl, position_logprobs, sample_traces
    from distillgame.plugins.mixing import kl_and_agreement, poe_mix
    from distillgame.plugins.reference import ReferenceModels

    ref = ReferenceModels(teacher, proxy)
    traces = sample_traces(ref, AutoTokenizer.from_pretrained(str(teacher)), prompts, tokens, seed)
    lp = position_logprobs(ref, traces, "poe")
    sampled = torch.tensor([t for ids, start in traces for t in ids[start:]])
    n = len(sampled)
    sums = dict.fromkeys(("teacher_nll", "proxy_nll", "argmax_agreement", "kl_teacher_proxy"), 0.0)
    for a in range(0, n, chunk):
        t = torch.log_softmax(lp.teacher[a: a + chunk].double(), dim=-1)
        p = torch.log_softmax(lp.proxy[a: a + chunk].double(), dim=-1)
        rows = torch.arange(t.shape[0])
        tok = sampled[a: a + chunk]
        # The teacher in the "released" slot: KL(teacher || proxy).
        kl, agree = kl_and_agreement(t, p)
        sums["teacher_nll"] -= float(t[rows, tok].sum())
        sums["proxy_nll"] -= float(p[rows, tok].sum())
        sums["argmax_agreement"] += float(agree.sum())
        sums["kl_teacher_proxy"] += float(kl.sum())
    result: dict[str, Any] = {"holdout_prompts": len(prompts), "holdout_positions": n, "holdout_seed": seed,
                              "uniform_nll": math.log(lp.teacher.shape[1])}
    result.update({k: v / n for k, v in sums.items()})
    try:
        gamma, kl_poe, _ = bisect(lambda g: mean_kl(lp, "poe", g), budget, 0.0, 0.999, tol=0.01)
    except ValueError as exc:  # the proxy is so close to the teacher that no gamma below 1 spends the budget
        logger.warning("no PoE gamma spends the budget %g: %s", budget, exc)
        result.update({"kl_budget": budget, "gamma_at_budget": None, "kl_poe_at_gamma": None,
                       "poe_argmax_agreement": None})
        return result
    kept = 0.0
    for a in range(0, n, chunk):
        t = torch.log_softmax(lp.teacher[a: a + chunk].double(), dim=-1)
        mixed = poe_mix(t, torch.log_softmax(lp.proxy[a: a + chunk].double(), dim=-1), torch.tensor(gamma))
        kept += float(kl_and_agreement(mixed, t)[1].sum())
    result.update({"kl_budget": budget, "gamma_at_budget": gamma, "kl_poe_at_gamma": kl_poe,
                   "poe_argmax_agreement": kept / n})
    return result


def format_table(meta: dict[str, Any]) -> str:
    q = meta["quality"]
    rows = [
        ("teacher NLL (nats/token)", f"{q['teacher_nll']:.3f}"),
        ("proxy NLL (nats/token)", f"{q['proxy_nll']:.3f}"),
        ("uniform NLL (nats/token)", f"{q['uniform_nll']:.3f}"),
        ("argmax = teacher's", f"{100 * q['argmax_agreement']:.1f}%"),
        ("KL(teacher || proxy) per token", f"{q['kl_teacher_proxy']:.3f}"),
    ]
    if q["gamma_at_budget"] is None:
        rows.append((f"PoE gamma at KL {q['kl_budget']:g}", "not reached below 1"))
    else:
        rows += [
            (f"PoE gamma at KL {q['kl_budget']:g}", f"{q['gamma_at_budget']:.3f}"),
            ("  KL(PoE mix || teacher) per token", f"{q['kl_poe_at_gamma']:.3f}"),
            ("  PoE argmax = teacher's", f"{100 * q['poe_argmax_agreement']:.1f}%"),
        ]
    width = max(len(name) for name, _ in rows)
    head = (f"{meta['derived_from']}: first {meta['num_layers']} of {meta['of']} layers + lens ({meta['dtype']}), "
            f"fit on {meta['fit_positions']} positions; held out: {q['holdout_prompts']} prompts, "
            f"{q['holdout_positions']} teacher-sampled tokens")
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows]) + "\n"


def _run(args: argparse.Namespace) -> int:
    teacher = Path(models.resolve(args.teacher, "teacher"))
    try:
        meta = build_proxy(teacher, args.layer, args.out, prompts=args.prompts, tokens=args.tokens, seed=args.seed,
                           holdout=args.holdout, task=args.task, dtype=args.dtype)
    except (ValueError, FileExistsError) as exc:
        sys.stderr.write(f"distillgame proxy: {exc}\n")
        return 2
    sys.stdout.write(format_table(meta))
    sys.stdout.write(f"wrote {args.out}\n")
    return 0
