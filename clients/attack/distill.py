"""Distill a student from collected traces: LoRA fine-tuning, passive or adaptive.

For: fine-tuning any transformers causal LM (the zoo's student base here,
Llama-3.2-3B on GPUs) with PEFT LoRA on ``collect``'s traces, the loss on the
completion tokens only (prompt tokens masked with -100, as TRL's
completion-only collators do). Defaults are the paper's (rank 128, lr 5e-4,
3 epochs, batch 6 x grad-accum 4, max length 2048); flags scale them down.

All students share everything (data order, seed, steps, initialisation); only
the weights differ:

- passive: ``w_i = 1/B``;
- adaptive, ``weighting="minibatch"`` (the paper's text): ``w ∝ exp(eta v)`` over
  the minibatch (Theorem 3.1), with ``v(x, y) = -<grad L_val(theta), grad log
  p(y|x; theta)>`` (eq. 3) over the LoRA parameters at the current theta,
  ``L_val`` the loss on a fixed validation set (its gradient re-estimated every
  ``val_every`` steps). ``eta`` is fixed, or set per minibatch so that
  KL(w || uniform) = rho.
- adaptive, ``weighting="released"`` (the authors' released code): once, at the
  LoRA-initialized theta_0 and over the whole training set, ``g = grad L_val``
  and ``a_i = (NLL_i(theta_0 - eps g) - NLL_i(theta_0 + eps g)) / (2 eps)``
  (NLL_i the mean token NLL of trace i; to first order ``<g, grad log p_i>``
  per token, i.e. minus eq. 3's v); ``w_i = exp(beta clip(a_i))`` divided by
  its mean, fixed for all epochs; a batch's loss is ``sum_i w_i NLL_i / B``.

``value_sign = -1`` negates either protocol's value before its weights are
formed, so the sign is measured, not argued. ``filters`` (see ``filters``) drop
traces before any of this.

Not for: serving the student (``evaluation`` loads the merged folder in vLLM)
or talking to the teacher (``collect``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from .weights import (
    effective_sample_size,
    eta_for_budget,
    kl_to_uniform,
    released_weights,
    tilt_weights,
    uniform_weights,
)

log = logging.getLogger(__name__)

@dataclass
class DistillConfig:
    student: str
    out: Path
    mode: str = "passive"  # "passive" | "adaptive"
    eta: float | None = None  # fixed tilt sharpness; None -> set from rho
    rho: float = 0.1  # KL(w || uniform) budget per minibatch when eta is None
    val_every: int = 1  # optimizer steps between re-estimates of grad L_val
    rank: int = 128
    lora_alpha: int | None = None  # None -> rank (LoRA scale 1)
    # False: full fine-tuning (every parameter trains; no adapters), for small
    # students trained from scratch, where LoRA's low rank only slows learning.
    lora: bool = True
    target_modules: str | list[str] = "all-linear"
    lr: float = 5e-4
    epochs: float = 3.0
    batch_size: int = 6
    grad_accum: int = 4
    max_length: int = 2048
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    vmap_chunk: int | None = None  # examples per vmap chunk (memory bound on big models)
    # v's log p(y|x): "sum" over completion tokens (eq. 3 as written) or "mean" per
    # token, the quantity each example's training loss takes a step on.
    value_norm: str = "sum"
    # A control: shuffle v within each minibatch before the tilt, so the weights
    # keep their spread (the same KL) but carry no information about the traces.
    # (For the released weighting the shuffle is one permutation over the whole set.)
    placebo: bool = False
    # "minibatch": eq. 3 at the current theta, tilted per minibatch; "released": the
    # authors' fixed weights from theta_0 (module docstring). Their defaults below.
    weighting: str = "minibatch"
    beta: float = 0.5
    # A variant: beta set so that the released weights, normalized over the whole
    # set, spend KL(w || uniform) = beta_rho (the paper's KL budget, eq. 2) instead
    # of a fixed beta whose spread depends on the scale of a.
    beta_rho: float | None = None
    fd_eps: float = 0.01
    clip: float = 10.0
    # +1: each protocol's own sign (eq. 3's v; the released a); -1 negates it.
    value_sign: int = 1
    # dtype of the released protocol's g and perturbed copies: in float32 the
    # central difference of two O(1) NLLs over 2 eps = 0.02 keeps ~5 digits.
    value_dtype: str = "float64"
    filters: list[str] = field(default_factory=list)
    save_merged: bool = True
    # Convergence: greedy accuracy after every epoch on a fixed validation set of the
    # student's own (``val_acc_n`` problems of ``val_acc_task``'s ``val_acc_split``:
    # never the test split, and not the validation problems L_val or the released
    # protocol's traces come from). None: no per-epoch evaluation.
    val_acc_task: str | None = None
    val_acc_split: str = "holdout"
    val_acc_n: int = 200
    val_acc_max_tokens: int = 256

    def __post_init__(self) -> None:
        from .filters import FILTERS

        if self.mode not in ("passive", "adaptive"):
            raise ValueError(f"mode must be passive or adaptive, got {self.mode!r}")
        if self.value_norm not in ("sum", "mean"):
            raise ValueError(f"value_norm must be sum or mean, got {self.value_norm!r}")
        if self.weighting not in ("minibatch", "released"):
            raise ValueError(f"weighting must be minibatch or released, got {self.weighting!r}")
        if self.value_sign not in (1, -1):
            raise ValueError(f"value_sign must be +1 or -1, got {self.value_sign!r}")
        if set(self.filters) - set(FILTERS):
            raise ValueError(f"filters must be among {FILTERS}, got {self.filters!r}")
        if self.val_acc_split == "test":
            raise ValueError("the per-epoch validation set must not come from the test split")
        self.out = Path(self.out)


@dataclass
class Example:
    """One tokenized (prompt, completion) pair; labels are -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]
    id: str = ""


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on prompt and padding
    ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- data


def tokenize_pair(tokenizer: Any, prompt: str, completion: str, max_length: int, id: str = "") -> Example:
    """Prompt and completion tokenized apart, so the mask boundary is exact (as in TRL)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    labels = ([-100] * len(p) + c)[:max_length]
    return Example(input_ids=ids, labels=labels, id=id)


def record_prompt(record: dict, tokenizer: Any) -> str:
    """The prompt text of a trace: as sent to /v1/completions, or the chat rendered for the student."""
    if "prompt" in record and record["prompt"] is not None:
        return record["prompt"]
    messages = record["messages"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def load_traces(
    path: Path, tokenizer: Any, max_length: int, filters: list[str] | tuple[str, ...] = ()
) -> tuple[list[Example], dict[str, int]]:
    """Training examples from a trace JSONL (``collect``'s output), sorted by id for a fixed order,
    after ``filters``; returns them and how many traces each filter dropped."""
    from .collect import read_records
    from .filters import filter_records

    records = [r for r in sorted(read_records(Path(path)).values(), key=lambda r: str(r["id"])) if r.get("completion")]
    dropped: dict[str, int] = {}
    if filters:
        records, dropped = filter_records(records, filters, tokenizer)
    examples = [
        tokenize_pair(tokenizer, record_prompt(r, tokenizer), r["completion"], max_length, str(r["id"]))
        for r in records
    ]
    return examples, dropped


def load_trace_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Training examples from a trace JSONL, unfiltered."""
    return load_traces(path, tokenizer, max_length)[0]


def load_validation_examples(task: str, split: str, n: int, tokenizer: Any, max_length: int, seed: int = 0) -> list[Example]:
    """The fixed validation objective: ground-truth solutions of a task split."""
    from distillgame.tasks import build_prompt, load_problems

    problems = [p for p in load_problems(task, split, n=n, seed=seed) if p.solution]
    if not problems:
        raise ValueError(f"{task}/{split} has no ground-truth solutions for the validation loss")
    return [tokenize_pair(tokenizer, build_prompt(p, task), p.solution, max_length, p.id) for p in problems]


def collate(examples: list[Example], pad_id: int) -> Batch:
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return Batch(ids, mask, labels, [e.id for e in examples])


def epoch_ends(n: int, batch_size: int, epochs: float, grad_accum: int) -> dict[int, int]:
    """{optimizer step: epoch} for the step that consumes an epoch's last minibatch
    (``minibatch_order``'s layout; with grad_accum > 1 that step may also hold the
    first minibatches of the next epoch). A fractional last epoch gets no entry."""
    out: dict[int, int] = {}
    micro, total, epoch = 0, int(round(epochs * n)), 0
    while total >= n:
        micro += math.ceil(n / batch_size)
        out[(micro - 1) // grad_accum] = epoch + 1
        total -= n
        epoch += 1
    return out


def plateau_epoch(accs: list[float], window: int = 3, min_gain: float = 0.01) -> int | None:
    """The plateau rule: the first epoch (1-based) at which the best validation accuracy so
    far has gained less than ``min_gain`` over the last ``window`` epochs, i.e.
    ``max(accs[:e]) - max(accs[:e - window]) < min_gain``; None if that never happens.

    The running best is monotone, so a noisy dip does not end training early; a
    noisy peak can only postpone the plateau (more epochs, never fewer).
    """
    for e in range(window + 1, len(accs) + 1):
        if max(accs[:e]) - max(accs[: e - window]) < min_gain:
            return e
    return None


def converged_by(accs: list[float], window: int = 10, min_gain: float = 0.01) -> bool:
    """The convergence check on one finished run: its last ``window`` epochs raised the best
    validation accuracy by less than ``min_gain`` over the best before them.

    Under a decaying learning rate a curve can stall and then climb as the rate
    anneals (on the zoo, LoRA sat near 12% for 25 epochs and then reached 29%), so
    a plateau found early in a run is no proof; the end of the schedule is.
    """
    return len(accs) > window and max(accs[-window:]) - max(accs[:-window]) < min_gain


def minibatch_order(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Example indices per minibatch: one seeded permutation per epoch, fractional last epoch."""
    order: list[list[int]] = []
    total = int(round(epochs * n))
    epoch = 0
    while total > 0:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()[: min(n, total)]
        order += [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
        total -= len(perm)
        epoch += 1
    return order


# ---------------------------------------------------------------- losses and values


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(y_t | x, y_<t) over completion tokens, and their count."""
    logits = logits[..., :-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):  # float32 and float64 stay as they are
        logits = logits.float()
    target = labels[..., 1:]
    mask = target != -100
    tok = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1), mask.sum(-1)


def per_example_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean token NLL of each example's completion, shape (B,)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp, count = sequence_logprobs(logits, batch.labels)
    return -logp / count.clamp(min=1)


def trainable_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def validation_grad(model: torch.nn.Module, val: list[Example], pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """grad_theta L_val at the current theta, L_val = mean over examples of their mean token NLL.

    autograd.grad returns the gradient without touching ``.grad``, so the
    training step that follows is unaffected (the eta = 0 test relies on it).
    """
    params = trainable_params(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(0, len(val), batch_size):
        batch = collate(val[i : i + batch_size], pad_id)
        loss = per_example_nll(model, batch).sum() / len(val)
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            total[n] += g
    return total


def example_values(
    model: torch.nn.Module,
    batch: Batch,
    g_val: dict[str, torch.Tensor],
    chunk: int | None = None,
    norm: str = "sum",
) -> torch.Tensor:
    """v_i = -<grad L_val, grad log p(y_i | x_i)> over the trainable parameters (eq. 3), shape (B,).

    ``norm="mean"`` divides each log p(y_i | x_i) by its completion length, so v_i
    is the first-order change in L_val from a step on example i's own training
    loss (its mean token NLL) instead of on its summed log-likelihood.

    Per-example gradients come from vmap(grad(...)) over a functional call of
    the model: one vectorized pass, not B backward passes. Each row runs alone
    (no attention mask): right padding sits after every real token, so under
    causal attention it changes no real position.
    """
    params = {n: p.detach() for n, p in trainable_params(model).items()}

    def logp_one(p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids.unsqueeze(0)}).logits
        logp, count = sequence_logprobs(logits, labels.unsqueeze(0))
        return logp[0] / count[0].clamp(min=1) if norm == "mean" else logp[0]

    with warnings.catch_warnings():
        # vmap over CPU scaled-dot-product attention falls back to a per-example
        # loop inside PyTorch (correct, slower); the warning would repeat every step.
        warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product.*")
        per_example = vmap(grad(logp_one), in_dims=(None, 0, 0), chunk_size=chunk)(
            params, batch.input_ids, batch.labels
        )
    v = torch.zeros(batch.input_ids.shape[0], dtype=torch.float64)
    for n, g in g_val.items():
        v -= (per_example[n].flatten(1).double() @ g.flatten().double())
    return v


def completion_nll(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int) -> torch.Tensor:
    """Per-example mean token NLL of the completions (no gradient), float64, shape (N,)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            out.append(per_example_nll(model, collate(examples[i : i + batch_size], pad_id)).to(torch.float64))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def released_values(
    model: torch.nn.Module,
    train_set: list[Example],
    val_set: list[Example],
    cfg: DistillConfig,
    pad_id: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The released protocol's value of every training example at the current theta, shape (N,).

    ``a_i = (NLL_i(theta - eps g) - NLL_i(theta + eps g)) / (2 eps)`` with ``g`` the
    gradient of the mean (over examples) of the mean token NLL on ``val_set``,
    both taken in ``cfg.value_dtype`` over the trainable (LoRA) parameters;
    times ``cfg.value_sign``. The model comes back with its exact parameters
    and dtype (casting up and back down is lossless).
    """
    batch_size = batch_size or cfg.batch_size
    dtype = getattr(torch, cfg.value_dtype)
    orig_dtype = next(model.parameters()).dtype
    saved = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    model.to(dtype)
    try:
        params = trainable_params(model)
        g = validation_grad(model, val_set, pad_id, batch_size)
        nll = {}
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n].to(dtype) + sign * cfg.fd_eps * g[n])
            nll[sign] = completion_nll(model, train_set, pad_id, batch_size)
    finally:
        model.to(orig_dtype)
        with torch.no_grad():
            for n, p in trainable_params(model).items():
                p.copy_(saved[n])
    a = (nll[-1] - nll[1]) / (2 * cfg.fd_eps)
    return -a if cfg.value_sign == -1 else a


# ---------------------------------------------------------------- validation accuracy


def load_val_problems(cfg: DistillConfig) -> list[Any]:
    from distillgame.tasks import load_problems

    return load_problems(cfg.val_acc_task, cfg.val_acc_split, n=cfg.val_acc_n)


def greedy_accuracy(
    model: torch.nn.Module, tokenizer: Any, problems: list[Any], task: str, max_new_tokens: int = 256,
    batch_size: int = 100, return_completions: bool = False,
) -> dict[str, Any]:
    """Greedy accuracy of the in-training student (transformers ``generate``, left-padded
    batches, cut at the task's stop strings as vLLM's ``distillgame eval`` cuts them);
    scored by ``evaluate.score_completions``, the one scoring path. Leaves the model in
    the mode it found it in."""
    from distillgame.evaluate import score_completions
    from distillgame.tasks import STOP_STRINGS, build_prompt

    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(problems), batch_size):
                prompts = [build_prompt(p, task) for p in problems[i : i + batch_size]]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     stop_strings=list(STOP_STRINGS), tokenizer=tokenizer)
                for row in out[:, enc["input_ids"].shape[1] :]:
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    for stop in STOP_STRINGS:
                        text = text.split(stop, 1)[0]
                    texts.append(text)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    rows = score_completions(problems, texts)
    out = {"accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "n": len(rows)}
    return {**out, "completions": texts} if return_completions else out


# ---------------------------------------------------------------- model


def load_student(cfg: DistillConfig) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=getattr(torch, cfg.dtype))
    return model.to(cfg.device), tokenizer


def add_lora(model: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
    """The student's trainable form: PEFT LoRA adapters, or (``cfg.lora=False``) the model
    itself with every parameter trainable. Seeds torch either way, so the data order
    and any later randomness do not depend on the recipe."""
    if not cfg.lora:
        torch.manual_seed(cfg.seed)
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    # Dropout 0: the value v must be a function of theta alone (and vmap needs
    # no randomness); the paper does not use LoRA dropout as a regulariser.
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha or cfg.rank,
        lora_dropout=0.0,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- training


def train(
    model: torch.nn.Module,
    train_set: list[Example],
    val_set: list[Example],
    cfg: DistillConfig,
    pad_id: int,
    on_step: Any = None,
    fixed_weights: torch.Tensor | None = None,
    on_epoch: Any = None,
) -> list[dict]:
    """The training loop for every student; returns one log row per optimizer step.

    ``model`` already carries its LoRA adapters. ``fixed_weights`` (one per
    training example, mean 1) are the released protocol's weights, required
    when ``cfg.weighting == "released"``. ``on_step(step, micro, batch, w, v)``
    is called with every minibatch before its update (tests use it);
    ``on_epoch(epoch, step)`` after the step that ends each full epoch (its return
    value, if any, goes into that step's log row as ``val``).
    """
    adaptive = cfg.mode == "adaptive"
    released = adaptive and cfg.weighting == "released"
    if released and fixed_weights is None:
        raise ValueError("the released weighting needs fixed_weights (see released_values)")
    micro_batches = minibatch_order(len(train_set), cfg.batch_size, cfg.epochs, cfg.seed)
    ends = epoch_ends(len(train_set), cfg.batch_size, cfg.epochs, cfg.grad_accum)
    n_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    if cfg.max_steps is not None:
        n_steps = min(n_steps, cfg.max_steps)
    params = list(trainable_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / n_steps)  # linear decay
    model.train()

    batches: Iterator[list[int]] = iter(micro_batches)
    history: list[dict] = []
    g_val: dict[str, torch.Tensor] | None = None
    placebo_gen = torch.Generator().manual_seed(cfg.seed)  # its own stream: training RNG untouched
    for step in tqdm(range(n_steps), desc=f"distill {cfg.mode}", unit="step", leave=False):
        t0 = time.perf_counter()
        if adaptive and not released and step % cfg.val_every == 0:
            g_val = validation_grad(model, val_set, pad_id, cfg.batch_size)
        optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {"step": step, "loss": 0.0, "nll": 0.0, "eta": [], "kl": [], "w_max": []}
        for micro in range(cfg.grad_accum):
            idx = next(batches, None)
            if idx is None:
                break
            batch = collate([train_set[i] for i in idx], pad_id)
            if released:
                v, eta = None, cfg.beta
                # Fixed weights of mean 1 over the whole set: sum_i w_i NLL_i / B.
                w = fixed_weights[idx].to(torch.float64) / len(idx)
            elif adaptive:
                v = example_values(model, batch, g_val, cfg.vmap_chunk, cfg.value_norm)
                if cfg.value_sign == -1:
                    v = -v
                if cfg.placebo:
                    v = v[torch.randperm(len(v), generator=placebo_gen)]
                eta = cfg.eta if cfg.eta is not None else eta_for_budget(v, cfg.rho)
                w = tilt_weights(v, eta)  # w ∝ exp(eta v), normalized in the minibatch
            else:
                v, eta = None, 0.0
                w = uniform_weights(len(idx))
            if on_step is not None:
                on_step(step, micro, batch, w, v)
            nll = per_example_nll(model, batch)
            loss = (w.to(nll.dtype) * nll).sum() / cfg.grad_accum  # <- the weights enter the loss here
            loss.backward()
            row["loss"] += loss.item()
            row["nll"] += nll.mean().item() / cfg.grad_accum  # unweighted, comparable across modes
            row["eta"].append(eta)
            row["kl"].append(kl_to_uniform(w / w.sum() if released else w))
            row["w_max"].append(float(w.max()))
            row.setdefault("ess", []).append(effective_sample_size(w))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row["lr"] = scheduler.get_last_lr()[0]
        row["seconds"] = time.perf_counter() - t0
        if on_epoch is not None and step in ends:
            t1 = time.perf_counter()
            val = on_epoch(ends[step], step)
            if val is not None:
                row["val"] = {"epoch": ends[step], **val, "seconds": time.perf_counter() - t1}
        history.append(row)
        log.debug("step %d loss %.4f eta %s", step, row["loss"], row["eta"])
    return history


def load_validation_set(
    cfg: DistillConfig, tokenizer: Any, val_traces: Path | None, val_task: str | None, val_split: str, val_n: int
) -> list[Example]:
    """L_val's examples: released traces (``val_traces``, e.g. the undefended teacher on a
    holdout split, as the authors' code) if given, else a task's ground-truth solutions."""
    if val_traces is not None:
        val_set = load_trace_examples(val_traces, tokenizer, cfg.max_length)
        if not val_set:
            raise ValueError(f"no usable traces in {val_traces}")
        return val_set
    if val_task is None:
        raise ValueError("the adaptive student needs a validation set (--val-traces or --val-task)")
    return load_validation_examples(val_task, val_split, val_n, tokenizer, cfg.max_length)


def value_stats(a: torch.Tensor, w: torch.Tensor, clip: float) -> dict[str, float]:
    """How spread the released weights are: the raw values, the clip's reach, the ESS, the beta used."""
    a = a.to(torch.float64)
    ac = a.clamp(-clip, clip)
    spread = float(ac.max() - ac.min())
    top = w.sort(descending=True).values[: max(1, len(w) // 5)]
    return {
        "a_mean": float(a.mean()),
        "a_std": float(a.std()) if len(a) > 1 else 0.0,
        "a_min": float(a.min()),
        "a_max": float(a.max()),
        "frac_clipped": float((a.abs() >= clip).double().mean()),
        "w_min": float(w.min()),
        "w_max": float(w.max()),
        "ess": effective_sample_size(w),
        "ess_frac": effective_sample_size(w) / len(w),
        "frac_mass_top20": float(top.sum() / w.sum()),
        "kl_to_uniform": kl_to_uniform(w / w.sum()),
        # w = exp(beta clip(a)) / mean, so beta = log(w_max / w_min) / spread of clip(a).
        "beta": float(math.log(w.max() / w.min()) / spread) if spread > 0 else 0.0,
    }


def fixed_released_weights(
    model: torch.nn.Module, train_set: list[Example], val_set: list[Example], cfg: DistillConfig, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, w): the released protocol's values at the current theta and its weights, mean 1;
    with ``cfg.placebo`` the weights are one seeded permutation of themselves."""
    a = released_values(model, train_set, val_set, cfg, pad_id)
    beta = cfg.beta if cfg.beta_rho is None else eta_for_budget(a.clamp(-cfg.clip, cfg.clip), cfg.beta_rho)
    w = released_weights(a, beta, cfg.clip)
    if cfg.placebo:
        w = w[torch.randperm(len(w), generator=torch.Generator().manual_seed(cfg.seed))]
    return a, w


def write_values(path: Path, examples: list[Example], a: torch.Tensor, w: torch.Tensor) -> None:
    """One line per trace: ``{"id", "value", "weight"}`` (weights as the loss uses them, mean 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e, ai, wi in zip(examples, a.tolist(), w.tolist()):
            f.write(json.dumps({"id": e.id, "value": ai, "weight": wi}) + "\n")


def values(
    cfg: DistillConfig,
    traces: Path,
    out: Path,
    val_traces: Path | None = None,
    val_task: str | None = None,
    val_split: str = "validation",
    val_n: int = 32,
) -> dict:
    """The released protocol's values and weights at theta_0 (the LoRA-initialized student),
    exactly as ``distill`` would train with them, written to ``out``; returns their statistics."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, dropped = load_traces(traces, tokenizer, cfg.max_length, cfg.filters)
    val_set = load_validation_set(cfg, tokenizer, val_traces, val_task, val_split, val_n)
    model = add_lora(model, cfg)
    a, w = fixed_released_weights(model, train_set, val_set, cfg, pad_id)
    write_values(Path(out), train_set, a, w)
    return {"n": len(train_set), "n_val": len(val_set), "dropped": dropped, **value_stats(a, w, cfg.clip)}


def distill(
    cfg: DistillConfig,
    traces: Path,
    val_task: str | None = None,
    val_split: str = "validation",
    val_n: int = 32,
    val_traces: Path | None = None,
) -> dict:
    """Load the student, train it on ``traces``, save adapter + merged model; returns the summary."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, dropped = load_traces(traces, tokenizer, cfg.max_length, cfg.filters)
    if not train_set:
        raise ValueError(f"no usable traces in {traces}")
    val_set: list[Example] = []
    if cfg.mode == "adaptive":
        val_set = load_validation_set(cfg, tokenizer, val_traces, val_task, val_split, val_n)
    model = add_lora(model, cfg)
    log.info("distill %s: %d traces (dropped %s), %d val examples, student %s", cfg.mode, len(train_set), dropped,
             len(val_set), cfg.student)
    t0 = time.perf_counter()
    fixed, weight_stats = None, None
    if cfg.mode == "adaptive" and cfg.weighting == "released":
        a, fixed = fixed_released_weights(model, train_set, val_set, cfg, pad_id)
        weight_stats = value_stats(a, fixed, cfg.clip)
        write_values(cfg.out / "values.jsonl", train_set, a, fixed)
        log.info("released weights: %s", weight_stats)
    on_epoch = None
    if cfg.val_acc_task is not None:
        val_problems = load_val_problems(cfg)

        def on_epoch(epoch: int, step: int) -> dict[str, Any]:
            acc = greedy_accuracy(model, tokenizer, val_problems, cfg.val_acc_task, cfg.val_acc_max_tokens)
            log.info("epoch %d (step %d): validation accuracy %.3f", epoch, step, acc["accuracy"])
            return acc

    history = train(model, train_set, val_set, cfg, pad_id, fixed_weights=fixed, on_epoch=on_epoch)
    wall = time.perf_counter() - t0
    curve = [{"epoch": r["val"]["epoch"], "step": r["step"], "val_acc": r["val"]["accuracy"], "n": r["val"]["n"],
              "seconds": r["val"]["seconds"]} for r in history if "val" in r]
    eval_s = sum(c["seconds"] for c in curve)

    cfg.out.mkdir(parents=True, exist_ok=True)
    merged_dir = None
    if not cfg.lora:
        model.save_pretrained(cfg.out / "merged")
        tokenizer.save_pretrained(cfg.out / "merged")
        merged_dir = str(cfg.out / "merged")
    else:
        model.save_pretrained(cfg.out / "adapter")
    if cfg.lora and cfg.save_merged:
        # A plain checkpoint folder (LoRA folded in) that vLLM loads like any model.
        merged = model.merge_and_unload()
        merged.save_pretrained(cfg.out / "merged")
        tokenizer.save_pretrained(cfg.out / "merged")
        merged_dir = str(cfg.out / "merged")
    with open(cfg.out / "log.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "traces": str(traces),
        "val_traces": str(val_traces) if val_traces else None,
        "n_train": len(train_set),
        "dropped": dropped,
        "n_val": len(val_set),
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "weights": weight_stats,
        "wall_s": wall,
        "train_s": wall - eval_s,
        "val_eval_s": eval_s,
        "learning_curve": curve,
        # The table's rule (a 10-epoch window; see table.TableConfig.plateau_window).
        "plateau_epoch": plateau_epoch([c["val_acc"] for c in curve], window=10) if curve else None,
        "converged": converged_by([c["val_acc"] for c in curve], window=10) if curve else None,
        "merged": merged_dir,
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
