"""Trace quality per defense: what the released reasoning looks like (the paper's Figure 2).

``distillgame bench quality`` collects traces for each teacher setting
(undefended, PoE at ``gamma``, ADS at ``lam``/``eps``) from a ``distillgame
serve`` endpoint, one API key per setting (it starts one itself, with the
attack table's policy writer, or takes ``--base-url`` and per-setting keys), on
a task's test prompts, and scores every trace:

- judge-free: answer accuracy (the task's math-verify checker), length in
  completion tokens (the server's usage), perplexity under the undefended
  teacher (transformers, batched, completion tokens only) and repetition (the
  fraction of word 4-grams that repeat an earlier 4-gram of the same trace);
- a rubric score from any OpenAI-compatible judge endpoint: a fixed prompt asks
  for one integer from 1 to 10 for the reasoning's coherence and correctness;
  the first such integer in the reply is the score, and replies without one are
  counted (``unparseable``), as are failed judge requests (``errors``).

The paper's judge is a frontier model. ``--judge-url self`` uses the server
this run starts (its undefended tier): that exercises the mechanism end to end,
but a small teacher's "scores" carry no information, and the report says so.

Results: ``quality.json`` (per setting: the aggregates and per-trace values;
the command and machine info), ``quality.md`` and ``quality.png``.

Not for: distilling students from the traces (``distillgame attack table``) or
timing the defense (``distillgame bench overhead``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distillgame.bench.overhead import Server, _fmt, machine_info, report_header, write_results
from distillgame.clients.attack.collect import CollectConfig, collect, read_records
from distillgame.clients.attack.table import Setting, mean_sem, parse_settings, write_policy

logger = logging.getLogger(__name__)

ZOO = Path(__file__).resolve().parent / "zoo"
# ADS's lam is matched to PoE at 0.65 on the zoo pair with the task gradient (task_ads_grad): both give a
# mean KL(released || teacher) of 0.29 nats/token at teacher-sampled positions of 32 validation prompts.
# The paper's lam = 0.05 moves the zoo proxy's tilt by only 2e-5 nats/token.
DEFAULT_SETTINGS = "none;poe:gamma=0.65;ads:lam=2.04,eps=1e-4"
QUICK_SETTINGS = "none;poe:gamma=0.65"
SELF = "self"  # --judge-url value: the server this run starts
JUDGE_KEY_ENV = ("DISTILLGAME_JUDGE_KEY", "OPENAI_API_KEY")
NGRAM = 4

RUBRIC = (
    "Grade this worked solution to a math word problem. Score the reasoning from 1 to 10 for coherence "
    "(each step follows from the question and earlier steps; no gibberish or loops) and correctness "
    "(right arithmetic, right final answer). 1 = incoherent or wrong, 10 = clear and fully correct. "
    "Reply with the score only: one integer from 1 to 10.\n\n"
    "Problem: {question}\n"
    "Reference final answer: {answer}\n\n"
    "Solution:\n{trace}\n\n"
    "Score (1-10):"
)

# An explicit "score: N", "N/10" or "N out of 10" wins; otherwise the first standalone integer 1..10
# (not part of a longer number, a decimal, a negative number or a "/10" / "out of 10" denominator).
# An echoed scale ("1-10", "1 to 10") is removed first.
_SCALE = re.compile(r"(?<!\d)1\s*(?:-|\u2013|to)\s*10(?!\d)", re.IGNORECASE)
_EXPLICIT = re.compile(r"score\D{0,12}?(?<![\d.-])(10|[1-9])(?!\d|\.\d)|"
                       r"(?<![\d.-])(10|[1-9])\s*(?:/|out\s+of)\s*10(?!\d)", re.IGNORECASE)
_STANDALONE = re.compile(r"(?<![\d./-])(?<!of )(10|[1-9])(?!\d|\.\d)")


@dataclass
class QualityConfig:
    """What one trace-quality run measures."""

    settings: list[Setting] = field(default_factory=lambda: parse_settings(DEFAULT_SETTINGS))
    task: str = "gsm-symbolic-easy"
    split: str = "test"
    n: int = 40
    max_tokens: int = 256
    temperature: float = 1.0  # released traces are sampled, as a distiller collects them
    seed: int = 0
    concurrency: int = 8
    teacher: str | None = str(ZOO / "teacher")  # None: the embedded default
    proxy: str | None = str(ZOO / "proxy")
    ads_grad: str | None = None  # None: computed from the task's validation solutions when ADS is asked for
    grad_problems: int = 64
    base_url: str | None = None  # a running endpoint instead of our own server
    api_keys: dict[str, str] = field(default_factory=dict)  # setting name -> key, with base_url
    model: str | None = None  # with base_url; default: the endpoint's first model
    judge_url: str | None = None  # None: no judge; "self": the server this run starts
    judge_model: str | None = None
    judge_key: str | None = None
    judge_api: str = "chat"
    judge_max_tokens: int = 16
    judge_concurrency: int = 4
    ppl_batch_size: int = 8
    threads: int = 1
    # float32: the server gives the proxy the teacher's dtype, and in bf16 weights ADS's theta +- eps*g
    # (eps = 1e-4) is mostly rounded away, so lam/(2 eps) amplifies rounding noise (seen on the zoo at
    # lam = 2.04: KL 11.5 nats/token in bf16 against 0.29 from the float32 reference models).
    serve_args: list[str] = field(
        default_factory=lambda: ["--max-model-len", "512", "--memory-share", "0.1", "--kv-cache-gib", "0.25",
                                 "--dtype", "float32"]
    )

    @classmethod
    def quick(cls) -> "QualityConfig":
        return cls(settings=parse_settings(QUICK_SETTINGS), n=4, max_tokens=96)

    def all_settings(self) -> list[Setting]:
        """The settings, the undefended teacher first (perplexity and the judge's "self" use it)."""
        unique: dict[str, Setting] = {"none": Setting("none", {"mode": "none"})}
        for s in self.settings:
            unique.setdefault(s.name, s)
        return list(unique.values())


# --------------------------------------------------------------------------- judge-free measures


def repetition(text: str, n: int = NGRAM) -> float:
    """Fraction of the word ``n``-grams of ``text`` that repeat an earlier ``n``-gram of it (0 with none)."""
    words = text.split()
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def completion_nll(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]],
                   batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL in nats, token count) of each completion given its prompt, under ``model``.

    Prompt and completion are tokenized apart (the prompt as the server does, the
    completion without special tokens), as generation produced them; only completion
    tokens are scored. Rows are batched by length, right-padded, with an attention mask.
    """
    seqs = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]) for p, c in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for r, i in enumerate(rows):
            prompt, completion = seqs[i]
            full = prompt + completion
            ids[r, : len(full)] = torch.tensor(full)
            mask[r, : len(full)] = 1
            scored[r, max(1, len(prompt)): len(full)] = True  # a first token with no context is not scored
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        target = scored[:, 1:]
        sums, counts = (nll * target).sum(1), target.sum(1)
        for r, i in enumerate(rows):
            out[i] = (float(sums[r]), int(counts[r]))
    return out


def perplexity(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]],
               batch_size: int = 8) -> list[float]:
    """exp(mean NLL per completion token) of each pair; NaN for an empty completion."""
    return [math.exp(s / k) if k else float("nan") for s, k in completion_nll(model, tokenizer, pairs, batch_size)]


# --------------------------------------------------------------------------- judge


def parse_judge_score(reply: str | None) -> int | None:
    """The score 1..10 in a judge's reply, or None when there is none."""
    if not reply:
        return None
    reply = _SCALE.sub(" ", reply)
    m = _EXPLICIT.search(reply)
    if m:
        return int(m.group(1) or m.group(2))
    m = _STANDALONE.search(reply)
    return int(m.group(1)) if m else None


def judge_prompt(question: str, answer: str, trace: str) -> str:
    return RUBRIC.format(question=question.strip(), answer=answer, trace=trace.strip())


@dataclass
class JudgeResult:
    score: int | None
    reply: str | None
    error: str | None = None


async def judge_all(items: list[tuple[str, str, str]], url: str, model: str, key: str, api: str = "chat",
                    max_tokens: int = 16, concurrency: int = 4) -> list[JudgeResult]:
    """One rubric request per (question, answer, trace), greedy; failures become ``JudgeResult.error``."""
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=3, timeout=600.0)
    sem = asyncio.Semaphore(concurrency)

    async def one(question: str, answer: str, trace: str) -> JudgeResult:
        prompt = judge_prompt(question, answer, trace)
        async with sem:
            try:
                if api == "chat":
                    r = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                        temperature=0.0)
                    reply = r.choices[0].message.content or ""
                else:
                    r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0.0)
                    reply = r.choices[0].text
            except openai.APIError as exc:
                logger.warning("judge request failed: %s", exc)
                return JudgeResult(None, None, error=f"{type(exc).__name__}: {exc}"[:300])
        return JudgeResult(parse_judge_score(reply), reply)

    async def run() -> list[JudgeResult]:
        tasks = [asyncio.ensure_future(one(*item)) for item in items]
        with tqdm(total=len(tasks), desc="judge", unit="trace") as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
        return [t.result() for t in tasks]

    try:
        return await run()
    finally:
        await client.close()


# --------------------------------------------------------------------------- collection


def task_ads_grad(work: Path, proxy: str | None, task: str, n: int) -> Path:
    """An ADS gradient of the proxy's loss on the task's validation solutions (``distillgame ads-grad``)."""
    from distillgame import tasks

    out = work / "ads_grad.safetensors"
    if out.exists():
        return out
    traces = work / "grad_traces.jsonl"
    with open(traces, "w") as fh:
        for p in tasks.load_problems(task, "validation", n=n):
            prompt, completion = tasks.training_text(p, task)
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    cmd = [sys.executable, "-m", "distillgame.cli", "ads-grad", "--traces", str(traces), "--out", str(out)]
    if proxy:
        cmd += ["--proxy", proxy]
    logger.info("computing the ADS gradient: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return out


def collect_traces(cfg: QualityConfig, setting: Setting, base_url: str, api_key: str, model: str,
                   work: Path) -> list[dict]:
    """The setting's records on the first ``n`` problems of the split, in problem order (resumes from ``work``)."""
    from distillgame import tasks

    out = work / setting.name / "traces.jsonl"
    collect(CollectConfig(base_url=base_url, model=model, task=cfg.task, split=cfg.split, out=out, n=cfg.n,
                          api_key=api_key, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                          concurrency=cfg.concurrency))
    records = read_records(out)
    questions = {p.id: p.question for p in tasks.load_problems(cfg.task, cfg.split, n=cfg.n)}
    return [{**records[pid], "question": q} for pid, q in questions.items() if pid in records]


def fidelity_counters(root_url: str) -> dict[str, dict[str, float]] | None:
    """The engine's cumulative fidelity counters by mode, from ``/metrics``; None where there is no such page.

    Settings are collected one after another, so the difference of two readings is one setting's fidelity.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(f"{root_url}/metrics", timeout=30)
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    names = {"distillgame_fidelity_kl_nats_total": "kl_nats", "distillgame_fidelity_tokens_total": "tokens",
             "distillgame_fidelity_argmax_agree_tokens_total": "agree"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name in names:
                out.setdefault(sample.labels["mode"], {})[names[sample.name]] = sample.value
    return out


def fidelity_delta(before: dict | None, after: dict | None, mode: str) -> dict[str, float] | None:
    """KL(released || teacher) per token and teacher-argmax agreement between two readings (eq. 1)."""
    if before is None or after is None or mode == "none":
        return None
    b, a = before.get(mode, {}), after.get(mode, {})
    tokens = a.get("tokens", 0.0) - b.get("tokens", 0.0)
    if tokens <= 0:
        return None
    return {"tokens": tokens, "kl_per_token": (a.get("kl_nats", 0.0) - b.get("kl_nats", 0.0)) / tokens,
            "argmax_agreement": (a.get("agree", 0.0) - b.get("agree", 0.0)) / tokens}


def _first_model(base_url: str, api_key: str) -> str:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data[0].id


# --------------------------------------------------------------------------- report


def _finite(xs: list[float | None]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(setting: Setting, traces: list[dict]) -> dict[str, Any]:
    """A setting's aggregates from its per-trace values."""
    lengths = [float(t["tokens"]) for t in traces]
    ppl = _finite([t["perplexity"] for t in traces])
    nll_sum = sum(t["nll_sum"] for t in traces)
    scored_tokens = sum(t["scored_tokens"] for t in traces)
    scores = [float(t["judge_score"]) for t in traces if t["judge_score"] is not None]
    hist = {str(k): sum(1 for s in scores if s == k) for k in range(1, 11)}
    return {
        "setting": setting.name, "label": setting.label, "defense": setting.defense, "n": len(traces),
        "accuracy": _mean([float(t["correct"]) for t in traces]),
        "accuracy_sem": mean_sem([float(t["correct"]) for t in traces])["sem"] if traces else None,
        "length_mean": _mean(lengths), "length_median": _median(lengths),
        "truncated": sum(1 for t in traces if t["finish_reason"] == "length"),
        "perplexity_mean": _mean(ppl), "perplexity_median": _median(ppl),
        "perplexity_corpus": math.exp(nll_sum / scored_tokens) if scored_tokens else None,
        "repetition_mean": _mean([t["repetition"] for t in traces]),
        "judge": {
            **(mean_sem(scores) if scores else {"mean": None, "sem": None, "n": 0}),
            "unparseable": sum(1 for t in traces if t.get("judge_error") is None and t["judge_score"] is None),
            "errors": sum(1 for t in traces if t.get("judge_error") is not None),
            "histogram": hist,
        } if any(t["judge_requested"] for t in traces) else None,
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = report_header(
        f"Trace quality per defense ({cfg['task']} {cfg['split']}, {cfg['n']} prompts per setting)", report)
    lines += [
        f"Teacher (perplexity): `{report['teacher']}`; sampling: temperature {cfg['temperature']}, "
        f"max_tokens {cfg['max_tokens']}, seed {cfg['seed']} + problem index.", "",
    ]
    lines += [
        "| Teacher | n | Acc. | KL / agree (engine) | Length mean / median (tok) | Truncated | "
        "Teacher PPL mean / median | Repeated 4-grams | Judge score (± sem) | Judge unparseable / errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        j = r["judge"]
        judge = "-" if j is None else f"{_fmt(j['mean'])} ± {_fmt(j['sem'])} (n={j['n']})"
        bad = "-" if j is None else f"{j['unparseable']} / {j['errors']}"
        fid = r.get("engine_fidelity")
        kl = "-" if fid is None else f"{fid['kl_per_token']:.3f} / {fid['argmax_agreement']:.2f}"
        lines.append(
            f"| {r['label']} | {r['n']} | {_fmt(r['accuracy'], '.3f')} | {kl} | {_fmt(r['length_mean'], '.1f')} / "
            f"{_fmt(r['length_median'], '.1f')} | {r['truncated']} | {_fmt(r['perplexity_mean'])} / "
            f"{_fmt(r['perplexity_median'])} | {_fmt(r['repetition_mean'], '.3f')} | {judge} | {bad} |"
        )
    lines += ["", "Acc.: final answer equal to the reference under math-verify. KL / agree: mean KL(released || "
              "teacher) in nats per token and teacher-argmax agreement over these traces, as the defense processor "
              "measured them (the server's /metrics, read before and after each setting). Length: completion tokens "
              "reported by the server. Teacher PPL: exp(mean NLL per completion token) of each trace under the "
              "undefended teacher (transformers, float32), then mean / median over traces. Repeated 4-grams: "
              "fraction of a trace's word 4-grams that repeat an earlier one, mean over traces. Judge: rubric score "
              "1-10 (coherence and correctness), greedy; unparseable = a reply with no integer 1..10, errors = "
              "failed requests.", ""]
    lines += [f"Judge: {report['judge_note']}", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [r["label"] for r in results]
    colors = [{"none": "gray", "poe": "tab:blue", "ads": "tab:red"}.get(r["defense"].get("mode"), "tab:green")
              for r in results]
    judged = any(r["judge"] is not None for r in results)
    fig, axes = plt.subplots(1, 4 if judged else 3, figsize=(4.2 * (4 if judged else 3), 4.2))
    panels = [("perplexity", "teacher perplexity (log)", True), ("tokens", "length (completion tokens)", False),
              ("repetition", "repeated word 4-grams (fraction)", False)]
    for ax, (key, title, log_y) in zip(axes, panels):
        data = [_finite([t[key] for t in r["traces"]]) or [float("nan")] for r in results]
        parts = ax.boxplot(data, patch_artist=True, showmeans=True)
        for patch, c in zip(parts["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    if judged:
        ax = axes[3]
        width = 0.8 / len(results)
        for k, (r, c) in enumerate(zip(results, colors)):
            hist = r["judge"]["histogram"] if r["judge"] else {}
            total = max(1, sum(hist.values()))
            xs = [s + (k - (len(results) - 1) / 2) * width for s in range(1, 11)]
            ax.bar(xs, [hist.get(str(s), 0) / total for s in range(1, 11)], width=width, color=c, alpha=0.7,
                   label=r["label"])
        ax.set_xticks(range(1, 11))
        ax.set_xlabel("judge score")
        ax.set_ylabel("share of parsed scores")
        ax.set_title("rubric judge" + (" (self-judged: not meaningful)" if report.get("judge_is_self") else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Released-trace quality per defense ({report['config']['task']}, n={report['config']['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "quality") -> None:
    write_results(report, out_dir, stem, markdown, plot)


# --------------------------------------------------------------------------- entry point


def score_traces(lm: torch.nn.Module, tok: Any, records: list[dict], judged: list[JudgeResult] | None,
                 judge_requested: bool, batch_size: int = 8) -> list[dict[str, Any]]:
    """Per-trace values of one setting: correctness, length, teacher perplexity, repetition, judge score."""
    nll = completion_nll(lm, tok, [(t["prompt"], t["completion"]) for t in records], batch_size)
    rows = []
    for i, (t, (nll_sum, k)) in enumerate(zip(records, nll)):
        row: dict[str, Any] = {
            "id": t["id"], "correct": bool(t["correct"]), "finish_reason": t["finish_reason"],
            "tokens": (t.get("usage") or {}).get("completion_tokens", k), "scored_tokens": k,
            "nll_sum": nll_sum, "perplexity": math.exp(nll_sum / k) if k else None,
            "repetition": repetition(t["completion"]), "judge_requested": judge_requested, "judge_score": None,
        }
        if judged is not None:
            row.update(judge_score=judged[i].score, judge_reply=judged[i].reply, judge_error=judged[i].error)
        rows.append(row)
    return rows


def _judge_target(cfg: QualityConfig, base_url: str, keys: dict[str, str], model: str) -> tuple[str, str, str] | None:
    """(url, model, key) of the judge, or None without one."""
    if cfg.judge_url is None:
        return None
    if cfg.judge_url == SELF:
        return base_url, cfg.judge_model or model, keys["none"]
    key = cfg.judge_key or next((os.environ[v] for v in JUDGE_KEY_ENV if os.environ.get(v)), "EMPTY")
    return cfg.judge_url, cfg.judge_model or _first_model(cfg.judge_url, key), key


def run_quality(cfg: QualityConfig, out_dir: Path, command: str = "", note: str = "",
                workdir: Path | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distillgame import models
    from distillgame.plugins.reference import load_causal_lm

    t_start = time.perf_counter()
    work = Path(workdir or tempfile.mkdtemp(prefix="distillgame-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = cfg.all_settings()
    server = None
    traces: dict[str, list[dict]] = {}
    judge_results: dict[str, list[JudgeResult]] = {}
    fidelity: dict[str, dict[str, float] | None] = {}
    judge: tuple[str, str, str] | None = None
    try:
        if cfg.base_url is None:
            grad = cfg.ads_grad
            if grad is None and any(s.defense.get("mode") == "ads" for s in settings):
                grad = str(task_ads_grad(work, cfg.proxy, cfg.task, cfg.grad_problems))
            keys = write_policy(work / "policy.toml", settings)
            args = ["--policy", str(work / "policy.toml"), "--served-model-name", "teacher", *cfg.serve_args]
            for flag, value in (("--teacher", cfg.teacher), ("--proxy", cfg.proxy), ("--ads-grad", grad)):
                if value:
                    args += [flag, value]
            server = Server(args, work / "server.log")
            server.wait_ready()
            base_url, model = f"{server.url}/v1", "teacher"
        else:
            missing = [s.name for s in settings if s.name not in cfg.api_keys]
            if missing:
                raise ValueError(f"--base-url needs a key per setting (--api-key NAME=KEY); missing: {missing}")
            keys, base_url = dict(cfg.api_keys), cfg.base_url
            model = cfg.model or _first_model(base_url, keys["none"])
        root = base_url.removesuffix("/").removesuffix("/v1")
        for s in settings:
            logger.info("collecting %s (%d prompts)", s.name, cfg.n)
            before = fidelity_counters(root)
            traces[s.name] = collect_traces(cfg, s, base_url, keys[s.name], model, work)
            fidelity[s.name] = fidelity_delta(before, fidelity_counters(root), s.defense.get("mode", "none"))
        judge = _judge_target(cfg, base_url, keys, model)
        if judge is not None:
            url, judge_model, key = judge
            for s in settings:
                items = [(t["question"], t["answer"], t["completion"]) for t in traces[s.name]]
                judge_results[s.name] = asyncio.run(judge_all(items, url, judge_model, key, cfg.judge_api,
                                                              cfg.judge_max_tokens, cfg.judge_concurrency))
        else:
            logger.warning("no --judge-url: rubric scores skipped")
    finally:
        if server is not None:
            server.stop()

    torch.set_num_threads(cfg.threads)
    teacher = models.resolve(cfg.teacher, "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    lm = load_causal_lm(teacher)
    results = []
    for s in settings:
        rows = score_traces(lm, tok, traces[s.name], judge_results.get(s.name), judge is not None,
                            cfg.ppl_batch_size)
        results.append({**summarize(s, rows), "engine_fidelity": fidelity.get(s.name), "traces": rows})

    judge_is_self = cfg.judge_url == SELF
    if judge is None:
        judge_note = "none (no --judge-url); rubric scores were not collected."
    elif judge_is_self:
        judge_note = (f"this run's own server, model `{judge[1]}` (undefended tier). The paper's judge is a "
                      "frontier model; a small task model cannot grade reasoning, so these scores only show that "
                      "the rubric requests, parsing and counting work end to end. They are meaningless as quality.")
    else:
        judge_note = (f"`{judge[1]}` at {judge[0]} ({cfg.judge_api} API, greedy, max_tokens "
                      f"{cfg.judge_max_tokens}); the rubric is in quality.json.")
    if judge_is_self:
        logger.warning("the judge is this run's own server: its scores are not a quality measure")
    config = {k: v for k, v in asdict(cfg).items() if k not in ("api_keys", "judge_key")}
    report = {
        "benchmark": "quality", "command": command, "config": config, "machine": machine_info(), "note": note,
        "teacher": teacher, "judge": None if judge is None else {"url": judge[0], "model": judge[1]},
        "judge_is_self": judge_is_self, "judge_note": judge_note, "rubric": RUBRIC,
        "wall_s": time.perf_counter() - t_start, "results": results,
    }
    write_report(report, out_dir)
    return report
