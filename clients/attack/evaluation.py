"""Accuracy of the two sides of the game.

For: the student's accuracy on a task split through the project's own
``distillgame eval`` code path (:func:`distillgame.evaluate.evaluate`, a local
vLLM engine, greedy), and the teacher's accuracy measured the attacker's way,
through its endpoint (greedy requests via ``collect``).

Not for: training (``distill``) or the whole protocol (``table``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .collect import CollectConfig, collect

log = logging.getLogger(__name__)


def student_accuracy(
    model: str, task: str, split: str, n: int, out_dir: Path, max_tokens: int = 512, **engine_opts: Any
) -> dict:
    """Greedy accuracy of a student folder (e.g. ``distill``'s ``merged/``); returns eval's summary."""
    from distillgame.evaluate import evaluate

    return evaluate(model, task, split, n, Path(out_dir), max_tokens=max_tokens, **engine_opts)


def teacher_accuracy(
    base_url: str,
    model: str,
    task: str,
    split: str,
    n: int,
    out: Path,
    api_key: str = "EMPTY",
    max_tokens: int = 512,
    concurrency: int = 8,
    **collect_opts: Any,
) -> dict:
    """Greedy accuracy of the teacher behind an endpoint, as released to this caller."""
    cfg = CollectConfig(
        base_url=base_url,
        model=model,
        task=task,
        split=split,
        n=n,
        out=Path(out),
        api_key=api_key,
        max_tokens=max_tokens,
        temperature=0.0,
        concurrency=concurrency,
        **collect_opts,
    )
    return collect(cfg)
