"""Filtering attackers: drop released traces before distilling from the rest.

For: the two cheap filters a distiller can run on collected traces without
any gradient, composable with every weighting of ``distill``:

- ``degenerate`` (answer-blind, as in the authors' released filter): a trace is
  dropped if its completion holds a letter from an unexpected script, or one
  token repeated ``min_repeat`` (8) or more times in a row. The script test is
  by Unicode character name: an alphabetic character (``str.isalpha``) whose
  ``unicodedata.name`` contains none of ``LATIN``, ``GREEK``, ``MATHEMATICAL``
  is foreign (CJK, Cyrillic, Arabic, Hebrew, Hangul, ...). Digits, punctuation,
  symbols and whitespace are never foreign. Tokens are the student's tokenizer's
  (the attacker has only the text).
- ``correct`` (rejection sampling): keep a trace only if its final answer
  matches the problem's ground truth, by the task's own answer check
  (:func:`distillgame.tasks.is_correct`, math-verify).

Not for: weighting the traces that survive (``distill``, ``weights``).
"""

from __future__ import annotations

import logging
import unicodedata
from functools import lru_cache
from typing import Any, Sequence

log = logging.getLogger(__name__)

FILTERS = ("degenerate", "correct")
EXPECTED_SCRIPTS = ("LATIN", "GREEK", "MATHEMATICAL")


@lru_cache(maxsize=None)
def is_foreign_letter(ch: str) -> bool:
    """An alphabetic character from a script not expected in an English math trace."""
    if not ch.isalpha():
        return False
    name = unicodedata.name(ch, "")
    return not any(script in name for script in EXPECTED_SCRIPTS)


def has_foreign_script(text: str) -> bool:
    return any(is_foreign_letter(ch) for ch in text)


def longest_token_run(tokens: Sequence[int]) -> int:
    """Length of the longest run of one token repeated back to back."""
    best = run = 0
    prev = None
    for t in tokens:
        run = run + 1 if t == prev else 1
        best = max(best, run)
        prev = t
    return best


def degenerate_reason(text: str, tokens: Sequence[int], min_repeat: int = 8) -> str | None:
    """Why a completion is degenerate ("script" or "repeat"), or None if it is clean."""
    if has_foreign_script(text):
        return "script"
    if longest_token_run(tokens) >= min_repeat:
        return "repeat"
    return None


def filter_records(
    records: list[dict], filters: Sequence[str], tokenizer: Any = None, min_repeat: int = 8
) -> tuple[list[dict], dict[str, int]]:
    """The records every filter keeps, and how many each filter dropped (applied in the order given).

    ``correct`` needs each record's ``answer`` (``collect`` stores it);
    ``degenerate`` needs a tokenizer for the repeated-token rule.
    """
    from distillgame import tasks

    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown filters {sorted(unknown)}; choose from {FILTERS}")
    dropped: dict[str, int] = {}
    kept = list(records)
    for name in filters:
        before = len(kept)
        if name == "degenerate":
            if tokenizer is None:
                raise ValueError("the degenerate filter needs a tokenizer")
            reasons = [
                degenerate_reason(r["completion"], tokenizer(r["completion"], add_special_tokens=False)["input_ids"],
                                  min_repeat)
                for r in kept
            ]
            kept = [r for r, why in zip(kept, reasons) if why is None]
            log.info("filter degenerate: dropped %d of %d (script %d, repeat %d)", before - len(kept), before,
                     reasons.count("script"), reasons.count("repeat"))
        else:
            kept = [r for r in kept if r.get("answer") is not None and tasks.is_correct(r["completion"], str(r["answer"]))]
            log.info("filter correct: dropped %d of %d", before - len(kept), before)
        dropped[name] = before - len(kept)
    return kept, dropped
