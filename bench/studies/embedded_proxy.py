"""How good is the embedded proxy? Its loss on the teacher's own traces, and what PoE costs with it.

Reproduces the numbers in ``docs/embedded-models.md``:

    python bench/studies/embedded_proxy.py --n 32 --tokens 128 --out bench/results/embedded_proxy

The teacher (embedded SmolLM2-135M-Instruct) samples answers (temperature 1,
up to ``--tokens`` tokens, stopping at EOS) to GSM-Symbolic *test* questions
in chat format; the lens is fitted on the train split. Over those completion
tokens it reports, for the teacher, the plain 10-layer cut (the proxy before
the lens) and the lens proxy (:func:`distillgame.models.default_proxy`):

- completion NLL (nats/token) of the sampled tokens;
- KL(teacher || model) and the argmax agreement with the teacher;
- for PoE (eq. 5) at given gammas: KL(released || teacher) and the released
  argmax's agreement with the teacher's, using the engine's own mixing.

Everything is computed by full forwards in float32 with log-probs in float64.
Not for: calibration (``distillgame bench calibrate``) or timing
(``distillgame bench overhead``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from distillgame import models

logger = logging.getLogger("embedded_proxy")


def sample_traces(model: Any, tok: Any, prompts: list[list[int]], tokens: int, seed: int,
                  batch: int = 16) -> list[tuple[list[int], int]]:
    """(ids, completion start) per prompt; the completion ends at EOS (included) or after ``tokens``."""
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    out = []
    for a in range(0, len(prompts), batch):
        chunk = prompts[a: a + batch]
        ids, mask = models.left_padded(chunk, eos)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=tokens, pad_token_id=eos)
        for i, p in enumerate(chunk):
            completion = gen[i, ids.shape[1]:].tolist()
            if eos in completion:
                completion = completion[: completion.index(eos) + 1]
            out.append((list(p) + completion, len(p)))
    return out


def position_logprobs(model: Any, ids: list[int], start: int, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1: len(ids) - 1, :vocab]
    return torch.log_softmax(logits.double(), dim=-1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillgame.plugins.mixing import kl_and_agreement, poe_mix
    from distillgame.tasks import build_chat_messages, load_problems

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="GSM-Symbolic test questions")
    ap.add_argument("--tokens", type=int, default=128, help="longest sampled answer")
    ap.add_argument("--gammas", default="0.65", help="comma-separated PoE gammas measured for both proxies")
    ap.add_argument("--calibrated", default=None,
                    help="JSON file with {'cut': gamma, 'lens': gamma}: each proxy's own calibrated gamma")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/embedded_proxy"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.monotonic()

    teacher_dir = models.default_teacher()
    cut_dir = models._atomic_save(lambda out: models.truncate_model(teacher_dir, out, models.PROXY_LAYERS),
                                  models.cache_dir() / "smollm2-135m-instruct-first10")
    lens_dir = models.default_proxy()
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
    teacher = load(teacher_dir)
    proxies = {"cut": load(cut_dir), "lens": load(lens_dir)}
    vocab = teacher.config.vocab_size

    prompts = []
    for p in load_problems("gsm-symbolic", "test", n=args.n):
        ids = tok.apply_chat_template(build_chat_messages(p, "gsm-symbolic"), add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    logger.info("sampling %d teacher traces", len(prompts))
    traces = sample_traces(teacher, tok, prompts, args.tokens, seed=0)

    gammas = {name: [float(g) for g in args.gammas.split(",") if g] for name in proxies}
    if args.calibrated:
        for name, g in json.loads(Path(args.calibrated).read_text()).items():
            gammas[name].append(float(g))
    sums: dict[str, float] = {"positions": 0.0, "teacher_nll": 0.0}
    for name in proxies:
        sums |= {f"{name}_nll": 0.0, f"{name}_kl": 0.0, f"{name}_agree": 0.0}
        for g in gammas[name]:
            sums |= {f"{name}_poe{g}_kl": 0.0, f"{name}_poe{g}_agree": 0.0}
    for ids, start in traces:
        target = torch.tensor(ids[start:])
        t = position_logprobs(teacher, ids, start, vocab)
        rows = torch.arange(len(target))
        sums["positions"] += len(target)
        sums["teacher_nll"] += float(-t[rows, target].sum())
        for name, model in proxies.items():
            p = position_logprobs(model, ids, start, vocab)
            sums[f"{name}_nll"] += float(-p[rows, target].sum())
            sums[f"{name}_agree"] += float((p.argmax(-1) == t.argmax(-1)).sum())
            sums[f"{name}_kl"] += float((t.exp() * (t - p)).sum(-1).clamp_min(0).sum())  # KL(teacher || proxy)
            for g in gammas[name]:
                kl, agree = kl_and_agreement(poe_mix(t, p, torch.tensor(g, dtype=torch.float64)), t)
                sums[f"{name}_poe{g}_kl"] += float(kl.sum())
                sums[f"{name}_poe{g}_agree"] += float(agree.sum())
    n = sums.pop("positions")
    result: dict[str, Any] = {
        "command": "python bench/studies/embedded_proxy.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "threads"),
        "questions": len(traces), "positions": int(n), "teacher": str(teacher_dir),
        "proxies": {"cut": str(cut_dir), "lens": str(lens_dir)},
        "lens_build": json.loads((lens_dir / "distillgame_proxy.json").read_text()),
        "metrics": {k: v / n for k, v in sums.items()}, "gammas": gammas,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedded_proxy.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["metrics"]
    lines = [f"# Embedded proxy on the teacher's own GSM-Symbolic traces ({len(traces)} questions, {int(n)} tokens)", "",
             f"`{result['command']}`", "",
             "| model | NLL (nats/token) | KL(teacher ‖ model) | argmax agreement |", "| --- | --- | --- | --- |",
             f"| teacher | {m['teacher_nll']:.2f} | 0 | 100% |"]
    for name, label in (("cut", "first 10 layers, teacher's head"), ("lens", "first 10 layers + lens")):
        lines.append(f"| {label} | {m[f'{name}_nll']:.2f} | {m[f'{name}_kl']:.2f} | {100 * m[f'{name}_agree']:.1f}% |")
    lines += ["", "| proxy | PoE gamma | KL(released ‖ teacher) | released argmax = teacher's |", "| --- | --- | --- | --- |"]
    for name in proxies:
        for g in gammas[name]:
            lines.append(f"| {name} | {g:g} | {m[f'{name}_poe{g}_kl']:.3f} | {100 * m[f'{name}_poe{g}_agree']:.1f}% |")
    (args.out / "embedded_proxy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
