"""Math tasks: problems, prompts and answer checking for every experiment here.

One module answers three questions for the harness, the benchmarks and
``distillgame eval``: which problems belong to a split (``load_problems``), how
a problem is shown to a model (``build_prompt`` for base models,
``build_chat_messages`` for instruct models), and whether a completion got it
right (``extract_answer`` / ``is_correct``, built on ``math-verify``).

Tasks:

* ``gsm-symbolic``: GSM8K-derived templates from the PyPI package
  ``reasoning-gym``, generated offline. Splits are disjoint by generator seed
  (each split draws from its own seed range); all splits share the same
  templates. Because a template has finitely many parameter settings, two seeds
  can produce the same question text, so train and holdout also drop any
  question that occurs in the first ``EVAL_RESERVE`` validation or test
  problems.
* ``gsm-symbolic-easy``: the same, restricted to ``EASY_TEMPLATES``: five
  templates whose chains of thought have two or three steps over numbers below
  about 100. A model trained from scratch on two CPU cores learns the language
  of all 85 templates quickly but not their arithmetic; on these five it can
  become good at the task, which the CPU-scale zoo needs.
* ``gsm8k`` and ``math``: the public datasets through ``datasets`` (hub ids as
  in the public antidistillation code: ``openai/gsm8k`` "main" and the seven
  subjects of ``EleutherAI/hendrycks_math``). ``data_dir`` points at local
  files in the same format instead (``{split}.jsonl``, used by the tests).
* ``jsonl:PATH``: any file of ``{"id", "question", "answer"}`` lines; the split
  is ignored.

Not for: generating teacher traces or training (see ``distillgame.bench.zoo``
and the attack harness), nor serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "holdout", "validation", "test")
# Each split of the generated tasks owns a disjoint range of generator seeds.
SPLIT_SEED_BASE = {"train": 0, "holdout": 10_000_000, "validation": 20_000_000, "test": 30_000_000}
# Train/holdout questions that also occur among this many validation or test
# problems are dropped, so evaluation never scores a memorised question.
EVAL_RESERVE = 2_000
EASY_TEMPLATES = (43, 31, 72, 48, 10)
GSM8K_HUB = ("openai/gsm8k", "main")
MATH_HUB = "EleutherAI/hendrycks_math"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
# Shares of the hub datasets' train split; their test split is the test split.
HUB_SPLIT_SHARES = {"train": (0.0, 0.7), "holdout": (0.7, 0.9), "validation": (0.9, 1.0)}
STOP_STRINGS = ("\nQuestion:",)
SYSTEM_PROMPT = (
    "You are a math teacher. Solve the problem step by step, then give the final "
    "answer on its own line as '#### ANSWER' (GSM-style tasks) or as \\boxed{ANSWER}."
)


@dataclass
class Problem:
    """One problem: ``answer`` is the reference final answer as text."""

    id: str
    question: str
    answer: str
    solution: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answer": self.answer, "solution": self.solution}


def task_family(task: str) -> str:
    """``gsm`` (answers after ``####``) or ``math`` (answers in ``\\boxed{}``)."""
    if task == "math":
        return "math"
    if task in ("gsm-symbolic", "gsm-symbolic-easy", "gsm8k") or task.startswith("jsonl:"):
        return "gsm"
    raise ValueError(f"unknown task {task!r}; expected gsm-symbolic, gsm-symbolic-easy, gsm8k, math or jsonl:PATH")


# ---------------------------------------------------------------- GSM-Symbolic


@lru_cache(maxsize=1)
def _gsm_generators() -> dict[int, Any]:
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import (
        GSMSymbolicDataset,
        GSMSymbolicDatasetConfig,
    )

    return GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=0, size=1)).generators


def gsm_templates(task: str) -> tuple[int, ...]:
    """Template ids a generated task draws from (reasoning-gym's working ones)."""
    if task == "gsm-symbolic-easy":
        return EASY_TEMPLATES
    if task == "gsm-symbolic":
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

        return tuple(tasks_ok)
    raise ValueError(f"{task!r} is not a generated task")


def generate_gsm_problem(template: int, seed: int) -> Problem:
    """Problem ``seed`` of one template: a pure function of its arguments."""
    example = _gsm_generators()[template](Random(seed), 1.0)
    cot: str = example["metadata"]["answer_cot"].strip()
    answer = cot.rsplit("####", 1)[1].strip()
    return Problem(id=f"t{template}-s{seed}", question=example["question"].strip(), answer=answer, solution=cot)


def _gsm_stream(task: str, split: str):
    """Problems of a split in their fixed order (template chosen per seed)."""
    templates = gsm_templates(task)
    base = SPLIT_SEED_BASE[split]
    i = 0
    while True:
        seed = base + i
        # The template is drawn from the seed too, so any prefix of a split is a
        # uniform template mix and the problem depends on nothing but `seed`.
        template = templates[Random(seed * 7919 + 17).randrange(len(templates))]
        try:
            yield generate_gsm_problem(template, seed)
        except (ValueError, ZeroDivisionError):  # a rare degenerate draw in some templates
            logger.debug("template %d seed %d failed to generate", template, seed)
        i += 1


@lru_cache(maxsize=4)
def _reserved_questions(task: str) -> frozenset[str]:
    out: set[str] = set()
    for split in ("validation", "test"):
        stream = _gsm_stream(task, split)
        out.update(next(stream).question for _ in range(EVAL_RESERVE))
    return frozenset(out)


def _load_gsm_symbolic(task: str, split: str, n: int | None) -> list[Problem]:
    if n is None:
        raise ValueError(f"{task} is unlimited: pass n")
    reserved = _reserved_questions(task) if split in ("train", "holdout") else frozenset()
    problems: list[Problem] = []
    seen: set[str] = set()
    for p in _gsm_stream(task, split):
        if len(problems) >= n:
            break
        # Drop repeats inside a split too: a repeated test question would weigh
        # twice, a repeated training question is wasted compute.
        if p.question in reserved or p.question in seen:
            continue
        seen.add(p.question)
        problems.append(p)
    return problems


# -------------------------------------------------------------- GSM8K and MATH


def gsm8k_final_answer(solution: str) -> str:
    """The text after ``####`` in a GSM8K solution, commas removed."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    start = text.find("{", idx)
    if start < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : j]
    return None


def _rows_to_problems(task: str, rows: list[dict[str, Any]], ids: list[str]) -> list[Problem]:
    problems = []
    for pid, row in zip(ids, rows):
        if task == "gsm8k":
            solution = row["answer"]
            problems.append(Problem(id=pid, question=row["question"], answer=gsm8k_final_answer(solution), solution=solution))
        else:
            solution = row["solution"]
            answer = last_boxed(solution)
            if answer is None:
                continue
            problems.append(Problem(id=pid, question=row["problem"], answer=answer, solution=solution))
    return problems


def _read_local(task: str, data_dir: Path, source_split: str) -> list[dict[str, Any]]:
    path = Path(data_dir) / f"{source_split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{task}: no {path} (expected {{train,test}}.jsonl in the hub's field format)")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_hub(task: str, source_split: str) -> list[dict[str, Any]]:
    from datasets import concatenate_datasets, load_dataset

    if task == "gsm8k":
        ds = load_dataset(*GSM8K_HUB, split=source_split)
    else:
        ds = concatenate_datasets([load_dataset(MATH_HUB, s, split=source_split) for s in MATH_SUBJECTS])
    return [dict(row) for row in ds]


def _load_hub_task(task: str, split: str, n: int | None, seed: int, data_dir: str | Path | None) -> list[Problem]:
    source_split = "test" if split == "test" else "train"
    rows = _read_local(task, Path(data_dir), source_split) if data_dir else _read_hub(task, source_split)
    order = list(range(len(rows)))
    if split != "test":
        # A fixed shuffle (not the caller's seed) so that splits never overlap.
        Random(42).shuffle(order)
        lo, hi = HUB_SPLIT_SHARES[split]
        order = order[int(lo * len(order)) : int(hi * len(order))]
    ids = [f"{task}-{source_split}-{i}" for i in order]
    problems = _rows_to_problems(task, [rows[i] for i in order], ids)
    return _subsample(problems, n, seed)


def _subsample(problems: list[Problem], n: int | None, seed: int) -> list[Problem]:
    if n is None or n >= len(problems):
        return problems
    idx = sorted(Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in idx]


def _load_jsonl(path: str, n: int | None, seed: int) -> list[Problem]:
    problems = []
    with open(path) as f:
        for k, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            problems.append(
                Problem(
                    id=str(row.get("id", k)),
                    question=row["question"],
                    answer=str(row["answer"]),
                    solution=row.get("solution"),
                )
            )
    return _subsample(problems, n, seed)


def load_problems(
    task: str, split: str, n: int | None = None, seed: int = 0, data_dir: str | Path | None = None
) -> list[Problem]:
    """The problems of ``task``'s ``split``.

    For the generated tasks ``n`` is required and the result is the first ``n``
    problems of the split (``seed`` is unused: the split is the seed range). For
    dataset tasks ``n`` draws a ``seed``-fixed subset (all problems when None).
    """
    if split not in SPLITS and not task.startswith("jsonl:"):
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if task.startswith("jsonl:"):
        return _load_jsonl(task[len("jsonl:") :], n, seed)
    if task in ("gsm-symbolic", "gsm-symbolic-easy"):
        return _load_gsm_symbolic(task, split, n)
    if task in ("gsm8k", "math"):
        return _load_hub_task(task, split, n, seed, data_dir)
    task_family(task)  # raises with the list of known tasks
    raise AssertionError


def problems_digest(problems: list[Problem]) -> str:
    """A short hash of a problem list, to show two runs used the same problems."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps(p.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- prompts


def build_prompt(problem: Problem, task: str) -> str:
    """Plain completion prompt for base models (the zoo is trained on it).

    GSM-style tasks expect a chain of thought ending in ``#### <answer>``; MATH
    expects one ending in ``\\boxed{<answer>}``. Generation stops at EOS or at
    the next ``\\nQuestion:``.
    """
    if task_family(task) == "math":
        return f"Question: {problem.question.strip()}\nPut the final answer in \\boxed{{}}.\nAnswer: "
    return f"Question: {problem.question.strip()}\nAnswer: "


def build_chat_messages(problem: Problem, task: str) -> list[dict[str, str]]:
    """Chat messages for instruct models (system prompt states the answer format)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": problem.question.strip()},
    ]


def training_text(problem: Problem, task: str) -> tuple[str, str]:
    """(prompt, completion) pair for supervised training on a known solution."""
    if problem.solution is None:
        raise ValueError(f"problem {problem.id} has no solution")
    return build_prompt(problem, task), problem.solution.strip()


# ------------------------------------------------------------ answer checking

_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?([-\d.,/\\{}a-z]+)", re.IGNORECASE)


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    answer = answer.strip("$ ")
    # Thousands separators, not decimal commas, in these datasets.
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: ``#### x``, else the last ``\\boxed{x}``, else None."""
    hashes = _HASH_RE.findall(text)
    if hashes:
        return _clean(hashes[-1])
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    m = _ANSWER_IS_RE.findall(text)
    if m:
        return _clean(m[-1])
    return None


def answers_match(predicted: str, reference: str) -> bool:
    """math-verify equivalence of two final answers (``1,234`` == ``1234``, ``\\frac12`` == ``0.5``)."""
    import threading

    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{_clean(reference)}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{_clean(predicted)}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return _clean(predicted) == _clean(reference)
    return bool(verify(gold, pred, timeout_seconds=timeout))


def is_correct(completion: str, answer: str) -> bool:
    """Whether a completion's final answer equals the reference answer."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    return answers_match(predicted, answer)
