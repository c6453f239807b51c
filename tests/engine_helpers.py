"""Drive a real vLLM engine step by step and check released tokens against the oracle."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

from vllm import SamplingParams

from distillgame.plugins.reference import ReferenceModels


@dataclass
class Job:
    prompt: list[int]
    defense: dict[str, Any]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    arrive_at_step: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            logprobs=0,
            ignore_eos=True,
            extra_args={"distillgame": self.defense},
        )


def run_staggered(llm, jobs: list[Job]) -> int:
    """Add each job at its arrival step and step the engine until all finish; return steps."""
    engine = llm.llm_engine
    pending = sorted(enumerate(jobs), key=lambda kv: kv[1].arrive_at_step)
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1].arrive_at_step <= step:
            i, job = pending.pop(0)
            engine.add_request(f"job-{i}", {"prompt_token_ids": job.prompt}, job.params())
        for out in engine.step():
            if out.finished:
                job = jobs[int(out.request_id.split("-")[1])]
                comp = out.outputs[0]
                job.tokens = list(comp.token_ids)
                job.logprobs = [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs)]
        step += 1
    return step


def worst_error(ref: ReferenceModels, jobs: list[Job], defense_override: dict | None = None) -> float:
    """Largest |engine logprob - oracle logprob| over every released token of every job."""
    worst = 0.0
    for job in jobs:
        assert len(job.tokens) == job.max_tokens, "every job must run to its max_tokens"
        seq = list(job.prompt)
        for tok, lp in zip(job.tokens, job.logprobs):
            temperature = job.temperature if job.temperature > 0 else 1.0
            expected = ref.next_token_logprobs(seq, defense_override or job.defense, temperature)
            worst = max(worst, abs(lp - float(expected[tok])))
            seq.append(tok)
    return worst


def num_preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
