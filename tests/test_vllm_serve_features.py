"""What vLLM's own OpenAI server adds under the defense: reasoning output and tool calls on a PoE tier.

One ``python -m vllm.entrypoints.openai.api_server`` with the policy
middleware (``VllmServeProcess``), started with ``--reasoning-parser
deepseek_r1`` and ``--enable-auto-tool-choice --tool-call-parser pythonic``,
on the tiny "thinking" pair (:func:`tiny_models.make_thinking_pair`: R1's
generation prompt opens a ``<think>`` block, and both models are steered to
close it often), driven with the ``openai`` SDK:

- the reasoning parser splits the defended tokens: ``reasoning`` is the text
  before the first released ``</think>``, ``content`` the text after it, and
  every released top-5 logprob is the float64 PoE reference's, not the teacher's;
- a named and a ``required`` tool choice return calls whose arguments validate
  against the tool's JSON schema. vLLM applies the tool's grammar only once
  the think block is closed (``vllm/v1/structured_output``), so the released
  distribution is the PoE mix before ``</think>`` and, after it, the PoE mix
  renormalized over the tokens the grammar allows: the released logprobs
  differ from the reference's by one constant per position.

vLLM 0.32 refuses named and ``required`` tool choices with a 400 unless a
tool-call parser is configured (they are parsed and constrained through it),
hence ``pythonic``, which needs no special tokens.

Not for: the policy's own checks on ``vllm serve`` (``test_gateway.py``).
"""

from __future__ import annotations

import json
import tomllib

import httpx
import jsonschema
import pytest

from conftest_server import VllmServeProcess, policy_text, serving
from test_gateway import STANDARD, _sdk
from tiny_models import THINK_END, make_thinking_pair

pytestmark = pytest.mark.slow

MODEL = "tiny-teacher"
# The tier the standard key gets in the policy the server runs.
DEFENSE = tomllib.loads(policy_text())["tiers"]["standard"]["defense"]
MESSAGES = [{"role": "user", "content": "Natalia sold clips to her friends. How many?"}]
FORECAST = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast for a city.",
                                           "parameters": FORECAST}}]
# What vLLM writes in place of -inf (a token the grammar masks) in a JSON response.
MASKED = -9999.0


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    teacher, proxy = make_thinking_pair(root)
    flags = ["--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]
    workdir = tmp_path_factory.mktemp("vllm-serve-thinking")
    # Room for tool calls: the JSON grammar lets a random model write long runs of whitespace.
    with serving(VllmServeProcess(workdir, teacher=teacher, proxy=proxy, max_model_len=512), flags) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(thinking_server):
    import torch

    from distillgame.plugins.reference import ReferenceModels

    torch.set_num_threads(1)
    return ReferenceModels(thinking_server.teacher, thinking_server.proxy)


@pytest.fixture(scope="module")
def tokenizer(thinking_server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(thinking_server.teacher))


def _prompt_ids(base: str, **chat: object) -> list[int]:
    """The prompt vLLM renders from the chat template for these messages (and tools)."""
    body = {"model": MODEL, "messages": MESSAGES, **chat}
    r = httpx.post(f"{base}/tokenize", headers=STANDARD, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _released(choice) -> tuple[list[int], list[dict[int, float]]]:
    """A choice's sampled ids and, per position, the released logprobs by id (the top ones and the sampled one)."""
    def tid(token: str) -> int:
        return int(token.split(":", 1)[1])

    entries = choice.logprobs.content
    tops = [{tid(t.token): t.logprob for t in e.top_logprobs} | {tid(e.token): e.logprob} for e in entries]
    return [tid(e.token) for e in entries], tops


def _offsets(reference, prompt: list[int], ids: list[int], tops: list[dict[int, float]],
             defense: dict) -> list[tuple[float, float]]:
    """Per position, the (smallest, largest) released-minus-reference logprob over the unmasked top tokens.

    Both are 0 where the released distribution is ``defense``'s; a constant
    ``-log Z > 0`` where it is ``defense``'s renormalized over a grammar's allowed tokens.
    """
    spans = []
    for pos, top in enumerate(tops):
        expected = reference.next_token_logprobs(prompt + ids[:pos], defense)
        diffs = [v - expected[t].item() for t, v in top.items() if v > MASKED]
        spans.append((min(diffs), max(diffs)))
    return spans


def test_reasoning_parser_splits_the_poe_defended_tokens(thinking_server, reference, tokenizer):
    base = thinking_server.base_url
    prompt = _prompt_ids(base)
    assert tokenizer.decode(prompt).endswith("<think>\n")
    end = tokenizer.convert_tokens_to_ids(THINK_END)
    r = _sdk(base).chat.completions.create(
        model=MODEL, messages=MESSAGES, n=4, max_tokens=48, seed=7, temperature=1.0, logprobs=True, top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True})
    assert len(r.choices) == 4
    split = 0
    worst, gap_to_teacher = 0.0, []
    for choice in r.choices:
        reasoning, content = choice.message.model_extra.get("reasoning"), choice.message.content
        ids, tops = _released(choice)
        assert len(ids) == len(tops) and all(len(t) >= 5 for t in tops)
        texts = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        if end in ids:
            # vLLM reports content None when generation stops right after </think>.
            cut = ids.index(end)
            assert reasoning == "".join(texts[:cut]), (reasoning, texts)
            assert (content or "") == "".join(texts[cut + 1:]), (content, texts)
            assert "".join(texts) == reasoning + THINK_END + (content or "")
            split += bool(reasoning) and bool(content)
        else:
            assert (reasoning, content) == ("".join(texts), None)
        spans = _offsets(reference, prompt, ids, tops, DEFENSE)
        worst = max(worst, *(max(-lo, hi) for lo, hi in spans))
        teacher = _offsets(reference, prompt, ids, tops, {"mode": "none"})
        gap_to_teacher += [max(-lo, hi) for lo, hi in teacher]
    assert split >= 1, [c.message for c in r.choices]
    assert worst < 1e-4, worst
    assert min(gap_to_teacher) > 1e-2, min(gap_to_teacher)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_forecast"}}, "required"],
                         ids=["named", "required"])
def test_tool_calls_follow_the_schema_under_poe(thinking_server, reference, tokenizer, tool_choice):
    base = thinking_server.base_url
    prompt = _prompt_ids(base, tools=TOOLS)
    end = tokenizer.convert_tokens_to_ids(THINK_END)
    r = _sdk(base).chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, n=3,
        max_tokens=400, seed=3, temperature=1.0, logprobs=True, top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True})
    assert len(r.choices) == 3
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_forecast"
        jsonschema.validate(json.loads(call.function.arguments), FORECAST)
        ids, tops = _released(choice)
        assert end in ids
        cut = ids.index(end)
        assert choice.message.model_extra.get("reasoning") == tokenizer.decode(ids[:cut], skip_special_tokens=True)
        spans = _offsets(reference, prompt, ids, tops, DEFENSE)
        # Up to and including </think>, no grammar: the PoE mix itself.
        assert max(max(-lo, hi) for lo, hi in spans[:cut + 1]) < 1e-4, spans[:cut + 1]
        # After it, the PoE mix renormalized over what the grammar allows: one offset per position.
        assert all(hi - lo < 2e-4 and lo > -1e-4 for lo, hi in spans[cut + 1:]), spans[cut + 1:]
        assert any(sum(v > MASKED for v in top.values()) >= 2 for top in tops[cut + 1:])
        teacher = _offsets(reference, prompt, ids, tops, {"mode": "none"})
        assert max(hi - lo for lo, hi in teacher) > 1e-2
