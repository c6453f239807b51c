"""Rebuild the CPU-scale model zoo from scratch: tokenizer, teacher, proxy, student base.

The paper distills a 7B reasoning teacher into a pretrained 3B student. This
recipe makes the same cast at a size two CPU cores train in about an hour:

* one byte-level BPE tokenizer in which every digit is its own token (so
  arithmetic is learnable digit by digit), trained on the corpora below;
* ``teacher``: a small Llama trained on GSM-Symbolic chains of thought
  (``gsm-symbolic-easy`` train split) until its validation accuracy reaches
  ``target_accuracy`` or its step budget runs out;
* ``proxy`` (the defender's student model): smaller, same tokenizer and
  vocabulary, trained on the same data for a much smaller budget, so it is
  weaker but related, as PoE needs;
* ``student-base`` (the attacker's model): another shape, pretrained only on
  generic arithmetic chains in the same answer format (never on the task's
  templates), so distillation has the task's language and reasoning to teach.

Everything is seeded and runs single-threaded with deterministic algorithms,
so a second build with the same seeds gives the same tokenizer and weights.
Checkpoints are Hugging Face folders (config, bf16 safetensors, tokenizer)
with head_dim 64, which vLLM's CPU attention supports.

Not for: evaluating through vLLM (``distillgame.evaluate``) or attacking.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from distillgame import tasks

logger = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent
TASK = "gsm-symbolic-easy"
EOS = "<|endoftext|>"


@dataclass
class ModelSpec:
    """Shape and training budget of one zoo model (all Llama, head_dim 64)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    max_steps: int
    lr: float = 2e-3
    batch_size: int = 32
    warmup: int = 50
    eval_every: int = 150
    eval_n: int = 200
    # Stop early once validation accuracy reaches this (None: run max_steps).
    target_accuracy: float | None = None
    seed: int = 0

    @property
    def heads(self) -> int:
        return self.hidden // 64


@dataclass
class ZooConfig:
    """The whole recipe; every number that shapes the zoo is here."""

    out_dir: Path = ZOO_DIR
    seed: int = 0
    vocab_size: int = 1024
    task_train_n: int = 40_000
    arith_train_n: int = 40_000
    max_len: int = 256
    threads: int = 1
    teacher: ModelSpec = field(
        default_factory=lambda: ModelSpec("teacher", 256, 4, 768, max_steps=1500, target_accuracy=0.85)
    )
    proxy: ModelSpec = field(default_factory=lambda: ModelSpec("proxy", 128, 2, 384, max_steps=150, eval_every=75))
    student: ModelSpec = field(
        default_factory=lambda: ModelSpec("student-base", 192, 3, 512, max_steps=400, eval_every=200)
    )

    def scaled(self, scale: float) -> "ZooConfig":
        """The same recipe with every step budget multiplied by ``scale`` (for smoke runs)."""
        import copy

        cfg = copy.deepcopy(self)
        for spec in (cfg.teacher, cfg.proxy, cfg.student):
            spec.max_steps = max(2, int(spec.max_steps * scale))
            spec.eval_every = max(1, int(spec.eval_every * scale))
            spec.warmup = max(1, int(spec.warmup * scale))
        cfg.task_train_n = max(200, int(cfg.task_train_n * scale))
        cfg.arith_train_n = max(200, int(cfg.arith_train_n * scale))
        return cfg


# ------------------------------------------------------------------ corpora


def arithmetic_chain(rng: random.Random) -> tuple[str, str]:
    """A generic arithmetic word-free chain in the task's answer format.

    Same kinds of steps as the task (+, -, x, /, small numbers) and the same
    ``#### n`` ending, none of the templates' language.
    """
    steps = rng.randint(1, 3)
    value = rng.randint(2, 60)
    expr = str(value)
    lines = []
    for _ in range(steps):
        op = rng.choice("+-*/")
        if op == "+":
            b = rng.randint(1, 60)
            new = value + b
        elif op == "-":
            b = rng.randint(1, max(1, value))
            new = value - b
        elif op == "*":
            b = rng.randint(2, 9)
            new = value * b
        else:
            divisors = [d for d in range(2, 10) if value % d == 0]
            if not divisors:
                op, b = "+", rng.randint(1, 30)
                new = value + b
            else:
                b = rng.choice(divisors)
                new = value // b
        lines.append(f"{value} {op} {b} = {new}.")
        expr = f"({expr} {op} {b})" if len(lines) > 1 else f"{expr} {op} {b}"
        value = new
    question = f"What is {expr}?"
    completion = "\n".join(lines) + f"\n#### {value}"
    return f"Question: {question}\nAnswer: ", completion


def task_corpus(cfg: ZooConfig) -> list[tuple[str, str]]:
    problems = tasks.load_problems(TASK, "train", n=cfg.task_train_n)
    return [tasks.training_text(p, TASK) for p in problems]


def arithmetic_corpus(cfg: ZooConfig) -> list[tuple[str, str]]:
    rng = random.Random(cfg.seed + 1)
    return [arithmetic_chain(rng) for _ in range(cfg.arith_train_n)]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE with every digit split off; saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None)
    fast.model_max_length = 512
    # A minimal chat template so the zoo also works behind chat endpoints: the
    # last user message becomes the same "Question: ...\nAnswer: " prompt.
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n{% endif %}"
        "{% if m['role'] == 'assistant' %}Answer: {{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer: {% endif %}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# ------------------------------------------------------------------ training


def encode(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per example; the completion ends with EOS."""
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + c)[:max_len]
        out.append((ids, len(p)))
    return out


def make_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, plen) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        # Completion-only loss: the prompt is context, not a target.
        labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
    return input_ids, attn, labels


def new_model(spec: ModelSpec, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=64,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[tasks.Problem], task: str, max_new_tokens: int = 96, batch: int = 50) -> float:
    """Greedy accuracy with transformers (monitoring only; reported numbers use vLLM)."""
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        enc = tokenizer([tasks.build_prompt(p, task) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(tasks.is_correct(t, p.answer) for t, p in zip(texts, chunk))
    model.train()
    return correct / len(problems)


def train_model(
    spec: ModelSpec,
    data: list[tuple[list[int], int]],
    tokenizer,
    vocab_size: int,
    val_problems: list[tasks.Problem],
    log: list[dict],
):
    """A plain AdamW loop with warmup + cosine decay; returns the trained model."""
    model = new_model(spec, vocab_size, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.2fM parameters, up to %d steps", spec.name, n_params / 1e6, spec.max_steps)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.max_steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    rng = random.Random(spec.seed + 12345)
    order: list[int] = []
    t0 = time.time()
    bar = tqdm(range(spec.max_steps), desc=f"train {spec.name}", mininterval=10)
    for step in bar:
        if len(order) < spec.batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: spec.batch_size], order[spec.batch_size :]
        input_ids, attn, labels = make_batch([data[i] for i in idx], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if val_problems and (done % spec.eval_every == 0 or done == spec.max_steps):
            acc = greedy_accuracy(model, tokenizer, val_problems, TASK)
            entry = {"model": spec.name, "step": done, "loss": round(loss.item(), 4), "val_accuracy": acc, "elapsed_s": round(time.time() - t0, 1)}
            log.append(entry)
            logger.info("%s", json.dumps(entry))
            if spec.target_accuracy is not None and acc >= spec.target_accuracy:
                logger.info("%s reached %.3f >= %.3f at step %d: stopping", spec.name, acc, spec.target_accuracy, done)
                break
    return model


def save_model(model, tokenizer, out: Path) -> None:
    """bf16 safetensors + tokenizer, written to a temp folder then moved into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_zoo(cfg: ZooConfig, only: tuple[str, ...] = ("teacher", "proxy", "student-base")) -> dict:
    """Build the zoo into ``cfg.out_dir``; returns the training log."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    task_pairs = task_corpus(cfg)
    arith_pairs = arithmetic_corpus(cfg)
    tok_dir = out_dir / "tokenizer"
    tokenizer = train_tokenizer([p + c for p, c in task_pairs + arith_pairs], cfg.vocab_size, tok_dir)
    vocab_size = len(tokenizer)
    logger.info("tokenizer: %d tokens", vocab_size)

    task_data = encode(tokenizer, task_pairs, cfg.max_len)
    arith_data = encode(tokenizer, arith_pairs, cfg.max_len)
    val = tasks.load_problems(TASK, "validation", n=max(cfg.teacher.eval_n, 1))
    log: list[dict] = []
    specs = {"teacher": (cfg.teacher, task_data), "proxy": (cfg.proxy, task_data), "student-base": (cfg.student, arith_data)}
    for name in only:
        spec, data = specs[name]
        model = train_model(spec, data, tokenizer, vocab_size, val[: spec.eval_n], log)
        save_model(model, tokenizer, out_dir / name)
        logger.info("saved %s (%.0f s since start)", out_dir / name, time.time() - t0)

    record = {
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "task": TASK,
        "templates": list(tasks.EASY_TEMPLATES),
        "vocab_size": vocab_size,
        "train_log": log,
        "build_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "build_log.json").write_text(json.dumps(record, indent=2))
    return record
