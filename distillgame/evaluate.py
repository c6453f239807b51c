"""Accuracy of a model on a task split, served through vLLM (batched, greedy).

``evaluate`` is the one scoring path: ``distillgame eval``, the zoo's reported
numbers and the attack harness's student evaluations all call it (or
``score_completions`` on completions they already have), so every accuracy in
this project is computed the same way.

Not for: defended generation (a defended engine comes from
``distillgame.engine``; pass ``defense=`` here only to score the defended
teacher itself) or training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distillgame import tasks

logger = logging.getLogger(__name__)


def score_completions(problems: list[tasks.Problem], completions: list[str]) -> list[dict[str, Any]]:
    """Per-problem records: extracted answer and correctness (math-verify)."""
    rows = []
    for p, text in zip(problems, completions, strict=True):
        predicted = tasks.extract_answer(text)
        correct = predicted is not None and tasks.answers_match(predicted, p.answer)
        rows.append({"id": p.id, "answer": p.answer, "predicted": predicted, "correct": bool(correct), "completion": text})
    return rows


def write_results(rows: list[dict[str, Any]], out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    summary = {**summary, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _engine_kwargs(model: str, max_model_len: int | None, memory_share: float, defense: dict | None, dtype: str, **engine_opts: Any) -> dict[str, Any]:
    if defense is not None:
        from distillgame.engine import EngineConfig, prepare_environment

        prepare_environment()
        cfg = EngineConfig(teacher=model, memory_share=memory_share, dtype=dtype, **engine_opts)
        if max_model_len is not None:
            cfg.max_model_len = max_model_len
        elif (Path(model) / "config.json").exists():
            # EngineConfig's default context can exceed a small model's own.
            own = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
            if own:
                cfg.max_model_len = min(cfg.max_model_len, int(own))
        return cfg.engine_kwargs()
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        gpu_memory_utilization=memory_share,
        enforce_eager=True,
        seed=0,
        disable_log_stats=True,
        **engine_opts,
    )
    if max_model_len is not None:
        # Otherwise vLLM takes the model's own context length.
        kwargs["max_model_len"] = max_model_len
    return kwargs


def generate(
    llm: Any,
    problems: list[tasks.Problem],
    task: str,
    max_tokens: int = 512,
    chat: bool = False,
    defense: dict | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions from a live ``vllm.LLM``, in chunks so progress shows."""
    from vllm import SamplingParams

    extra = {"distillgame": defense} if defense is not None else None
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        stop=list(tasks.STOP_STRINGS) if not chat else None,
        extra_args=extra,
    )
    texts: list[str] = []
    with tqdm(total=len(problems), desc="eval", unit="problem") as bar:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            if chat:
                outs = llm.chat([tasks.build_chat_messages(p, task) for p in chunk], params, use_tqdm=False)
            else:
                outs = llm.generate([tasks.build_prompt(p, task) for p in chunk], params, use_tqdm=False)
            texts.extend(o.outputs[0].text for o in outs)
            bar.update(len(chunk))
    return texts


def evaluate(
    model: str,
    task: str,
    split: str,
    n: int,
    out_dir: Path,
    max_tokens: int = 512,
    *,
    chat: bool = False,
    data_dir: str | None = None,
    defense: dict | None = None,
    llm: Any = None,
    max_model_len: int | None = None,
    memory_share: float = 0.1,
    dtype: str = "auto",
    **engine_opts: Any,
) -> dict[str, Any]:
    """Greedy accuracy of ``model`` (folder or hub id) on ``n`` problems of a task split.

    Writes ``out_dir/results.jsonl`` (one record per problem) and
    ``out_dir/summary.json`` (with ``accuracy``) and returns the summary. Pass a
    live ``llm`` to reuse an engine (its model must be ``model``).
    """
    problems = tasks.load_problems(task, split, n=n, data_dir=data_dir)
    t0 = time.time()
    if llm is None:
        from vllm import LLM

        llm = LLM(**_engine_kwargs(model, max_model_len, memory_share, defense, dtype, **engine_opts))
        if defense is not None:
            from distillgame.engine import verify_defense_live
            from distillgame.plugins.processor import status_rpc

            # A defended evaluation must measure the defense, not the bare teacher.
            verify_defense_live(llm.collective_rpc(status_rpc))
    texts = generate(llm, problems, task, max_tokens=max_tokens, chat=chat, defense=defense)
    rows = score_completions(problems, texts)
    summary = write_results(
        rows,
        Path(out_dir),
        {
            "model": str(model),
            "task": task,
            "split": split,
            "chat": chat,
            "defense": defense,
            "max_tokens": max_tokens,
            "problems_digest": tasks.problems_digest(problems),
            "seconds": round(time.time() - t0, 1),
        },
    )
    logger.info("%s on %s/%s: accuracy %.3f (%d/%d)", model, task, split, summary["accuracy"], summary["correct"], summary["n"])
    return summary
