"""Start-up checks of the defense processor."""

from __future__ import annotations

import pytest

from distillgame.plugins.mixing import parse_defense
from distillgame.plugins.processor import check_same_tokenizer
from tiny_models import make_llama, make_tokenizer


def test_different_tokenizers_are_refused_clearly(tmp_path, tiny_pair):
    teacher, _ = tiny_pair
    other = make_llama(tmp_path / "other", make_tokenizer(vocab_size=300), layers=1)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(str(teacher), str(other))
    check_same_tokenizer(str(teacher), str(teacher))


@pytest.mark.parametrize(
    "section, param",
    [
        ({"mode": "poe", "gamma": -0.1}, "distillgame.gamma"),
        ({"mode": "poe", "gamma": True}, "distillgame.gamma"),
        ({"mode": "poe", "gamma": float("nan")}, "distillgame.gamma"),
        ({"mode": "ads", "lam": -1.0, "eps": 1e-4}, "distillgame.lam"),
        ({"mode": "ads", "lam": 0.1, "eps": 0.0}, "distillgame.eps"),
        ({"mode": "poe", "gamma": 0.5, "lam": 1.0}, "distillgame.lam"),
        ({"mode": "off"}, "distillgame.mode"),
    ],
)
def test_bad_defense_values_name_the_parameter(section, param):
    with pytest.raises(ValueError, match=param):
        parse_defense({"distillgame": section})


def test_absent_or_none_defense_is_untouched():
    assert not parse_defense(None).active
    assert not parse_defense({"other": 1}).active
    assert not parse_defense({"distillgame": {"mode": "none"}}).active
    assert parse_defense({"distillgame": {"mode": "poe", "gamma": 1}}).gamma == 1.0


def test_processor_passed_twice_is_refused(tiny_pair, capfd):
    """The entry point already loads it; an explicit copy would apply the mix twice."""
    from distillgame.engine import EngineConfig
    from distillgame.plugins.processor import DefenseLogitsProcessor
    from vllm import LLM

    teacher, proxy = tiny_pair
    kwargs = EngineConfig(teacher=str(teacher), proxy=str(proxy), max_model_len=128, memory_share=0.05).engine_kwargs()
    with pytest.raises(RuntimeError):
        LLM(logits_processors=[DefenseLogitsProcessor], **kwargs)
    captured = capfd.readouterr()
    assert "loaded twice" in captured.out + captured.err
