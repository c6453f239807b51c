"""The reference approach is a faithful PoE: its cached proxy processor matches the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from distillgame.bench.reference_hf import CachedProxyPoE, Request, RowLimits, hf_serve


@pytest.fixture(scope="module")
def ref():
    from distillgame import models
    from distillgame.plugins.reference import ReferenceModels

    torch.set_num_threads(1)
    return ReferenceModels(models.resolve(None, "teacher"), models.resolve(None, "proxy"))


def test_cached_proxy_poe_matches_the_oracle_with_left_padding(ref):
    gamma = 0.4
    seqs = [[1000, 1001, 1002, 1003, 1004], [2000, 2001, 2002]]
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    vocab = ref._vocab(ref.proxy)
    proc = CachedProxyPoE(ref.proxy, mask, gamma, vocab)
    for nxt in ([3000, 3001], [3100, 3101], [3200, 3201]):
        cur = torch.tensor([seqs[0], [0, 0, *seqs[1]]])
        full_mask = torch.cat([mask, torch.ones(2, cur.shape[1] - mask.shape[1], dtype=torch.long)], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():  # the teacher scores generate would hand the processor
            scores = ref.teacher(input_ids=cur, attention_mask=full_mask, position_ids=pos).logits[:, -1].float()
        mixed = torch.log_softmax(proc(cur, scores.clone()), dim=-1)
        for row in range(2):
            want = ref.next_token_logprobs(seqs[row], {"mode": "poe", "gamma": gamma})
            assert torch.allclose(mixed[row, :vocab].double(), want[:vocab], atol=2e-3)
        for row in range(2):
            seqs[row].append(nxt[row])


def test_row_limits_end_each_row_at_its_own_length(ref):
    tok = AutoTokenizer.from_pretrained(ref.teacher_path)
    limits = RowLimits(prompt_len=3, limits=[1, 4], eos=tok.eos_token_id)
    scores = torch.zeros(2, 10 + tok.eos_token_id)
    out = limits(torch.zeros(2, 3, dtype=torch.long), scores.clone())
    assert out[0].argmax() == tok.eos_token_id and torch.isinf(out[0]).sum() == out.shape[1] - 1
    assert torch.all(out[1] == 0)
    res = hf_serve(ref.teacher, ref.proxy, tok, [Request([1000, 1001], 3), Request([1002], 6)], batch=2, gamma=0.3)
    assert res["requests"] == 2 and 2 <= res["tokens"] <= 9
