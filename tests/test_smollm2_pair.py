"""The embedded default pair (SmolLM2-135M-Instruct and its 10-layer proxy) through the engine."""

from __future__ import annotations

import pytest

from distillgame import models
from distillgame.engine import EngineConfig, build_llm
from distillgame.plugins.reference import ReferenceModels
from engine_helpers import Job, run_staggered, shutdown, worst_error


@pytest.fixture(scope="module")
def smol_llm():
    llm = build_llm(
        EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=4, memory_share=0.12, kv_cache_bytes=256 << 20)
    )
    yield llm
    shutdown(llm)


def test_proxy_is_a_truncated_teacher_sharing_the_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    teacher, proxy = models.default_teacher(), models.default_proxy()
    assert AutoConfig.from_pretrained(teacher).num_hidden_layers == 30
    assert AutoConfig.from_pretrained(proxy).num_hidden_layers == models.PROXY_LAYERS
    assert AutoTokenizer.from_pretrained(teacher).get_vocab() == AutoTokenizer.from_pretrained(proxy).get_vocab()


def test_default_pair_poe_matches_reference(smol_llm):
    tok = smol_llm.get_tokenizer()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30? Answer briefly."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(chat, add_special_tokens=False)["input_ids"]
    jobs = [
        Job(prompt, {"mode": "poe", "gamma": 0.65}, max_tokens=8),
        Job(prompt[:12], {"mode": "poe", "gamma": 0.3}, max_tokens=6, temperature=0.7, seed=5, arrive_at_step=2),
        Job(prompt, {"mode": "none"}, max_tokens=8),
    ]
    run_staggered(smol_llm, jobs)
    ref = ReferenceModels(models.default_teacher(), models.default_proxy())
    assert worst_error(ref, jobs) < 1e-4
    # The defense visibly moves the real model's distribution.
    assert worst_error(ref, jobs[:1], defense_override={"mode": "none"}) > 1e-2
