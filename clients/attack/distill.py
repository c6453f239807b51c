"""Distill a student from collected traces: LoRA fine-tuning, passive or adaptive.

For: fine-tuning any transformers causal LM (the zoo's student base here,
Llama-3.2-3B on GPUs) with PEFT LoRA on ``collect``'s traces, the loss on the
completion tokens only (prompt tokens masked with -100, as TRL's
completion-only collators do). Defaults are the paper's (rank 128, lr 5e-4,
3 epochs, batch 6 x grad-accum 4, max length 2048); flags scale them down.

Two students share everything (data order, seed, steps, initialisation); only
the minibatch weights differ:

- passive: ``w_i = 1/B``;
- adaptive: ``w ∝ exp(eta v)`` over the minibatch (Theorem 3.1), with
  ``v(x, y) = -<grad L_val(theta), grad log p(y|x; theta)>`` (eq. 3) over the
  LoRA parameters at the current theta, ``L_val`` the loss on a fixed set of
  ground-truth solutions (its gradient re-estimated every ``val_every`` steps).
  ``eta`` is fixed, or set per minibatch so that KL(w || uniform) = rho.

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

from .weights import eta_for_budget, kl_to_uniform, tilt_weights, uniform_weights

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
    placebo: bool = False
    save_merged: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("passive", "adaptive"):
            raise ValueError(f"mode must be passive or adaptive, got {self.mode!r}")
        if self.value_norm not in ("sum", "mean"):
            raise ValueError(f"value_norm must be sum or mean, got {self.value_norm!r}")
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


def load_trace_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Training examples from a trace JSONL (``collect``'s output), sorted by id for a fixed order."""
    from .collect import read_records

    records = sorted(read_records(Path(path)).values(), key=lambda r: str(r["id"]))
    return [
        tokenize_pair(tokenizer, record_prompt(r, tokenizer), r["completion"], max_length, str(r["id"]))
        for r in records
        if r.get("completion")
    ]


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
    logits = logits[..., :-1, :].float()
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


# ---------------------------------------------------------------- model


def load_student(cfg: DistillConfig) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=getattr(torch, cfg.dtype))
    return model.to(cfg.device), tokenizer


def add_lora(model: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
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
) -> list[dict]:
    """The training loop for both students; returns one log row per optimizer step.

    ``model`` already carries its LoRA adapters. ``on_step(step, micro, batch, w, v)``
    is called with every minibatch before its update (tests use it).
    """
    adaptive = cfg.mode == "adaptive"
    micro_batches = minibatch_order(len(train_set), cfg.batch_size, cfg.epochs, cfg.seed)
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
        if adaptive and step % cfg.val_every == 0:
            g_val = validation_grad(model, val_set, pad_id, cfg.batch_size)
        optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {"step": step, "loss": 0.0, "nll": 0.0, "eta": [], "kl": [], "w_max": []}
        for micro in range(cfg.grad_accum):
            idx = next(batches, None)
            if idx is None:
                break
            batch = collate([train_set[i] for i in idx], pad_id)
            if adaptive:
                v = example_values(model, batch, g_val, cfg.vmap_chunk, cfg.value_norm)
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
            row["kl"].append(kl_to_uniform(w))
            row["w_max"].append(float(w.max()))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row["lr"] = scheduler.get_last_lr()[0]
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log.debug("step %d loss %.4f eta %s", step, row["loss"], row["eta"])
    return history


def distill(
    cfg: DistillConfig,
    traces: Path,
    val_task: str | None = None,
    val_split: str = "validation",
    val_n: int = 32,
) -> dict:
    """Load the student, train it on ``traces``, save adapter + merged model; returns the summary."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = load_trace_examples(traces, tokenizer, cfg.max_length)
    if not train_set:
        raise ValueError(f"no usable traces in {traces}")
    val_set: list[Example] = []
    if cfg.mode == "adaptive":
        if val_task is None:
            raise ValueError("adaptive mode needs a validation task (--val-task)")
        val_set = load_validation_examples(val_task, val_split, val_n, tokenizer, cfg.max_length)
    model = add_lora(model, cfg)
    log.info("distill %s: %d traces, %d val examples, student %s", cfg.mode, len(train_set), len(val_set), cfg.student)
    t0 = time.perf_counter()
    history = train(model, train_set, val_set, cfg, pad_id)
    wall = time.perf_counter() - t0

    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out / "adapter")
    merged_dir = None
    if cfg.save_merged:
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
        "n_train": len(train_set),
        "n_val": len(val_set),
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "wall_s": wall,
        "merged": merged_dir,
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
