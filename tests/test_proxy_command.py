"""``distillgame proxy``: an early exit of a tiny float32 teacher, its read-out, its quality numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_llama, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillgame import cli, models
from distillgame.proxy_cli import build_proxy

LAYERS, EXIT = 3, 2
FIT = {"prompts": 2, "tokens": 8, "seed": 0}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("proxy_command")
    teacher = make_llama(root / "teacher", make_tokenizer(), layers=LAYERS, init_std=0.3)
    meta = build_proxy(teacher, EXIT, root / "proxy", holdout=4, **FIT)
    return teacher, root / "proxy", meta


def test_layers_and_embedding_are_the_teachers_bytes_in_its_dtype(built):
    teacher, proxy, _ = built
    ours, theirs = _tensors(proxy), _tensors(teacher)
    kept = [n for n in ours if n not in ("model.norm.weight", "lm_head.weight")]
    assert "model.embed_tokens.weight" in kept
    assert {n.split(".")[2] for n in kept if n.startswith("model.layers.")} == {str(i) for i in range(EXIT)}
    for name in kept:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), name
    assert ours["lm_head.weight"].dtype == torch.float32
    config = json.loads((proxy / "config.json").read_text())
    assert config["num_hidden_layers"] == EXIT and config["tie_word_embeddings"] is False


def test_logits_are_the_fitted_read_out_of_the_teachers_state(built):
    teacher_dir, proxy_dir, _ = built
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    proxy = AutoModelForCausalLM.from_pretrained(str(proxy_dir)).eval()
    assert proxy.config.num_hidden_layers == EXIT and proxy.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    # The fit is seeded: refitting on the same samples gives the build's B.
    x, y = models.lens_pairs(teacher, tok, models.lens_prompts(tok, FIT["prompts"]), EXIT, FIT["tokens"], FIT["seed"])
    b = models.fit_lens(x, y)
    ids = torch.tensor([tok("How many clips did Natalia sell in April and May?")["input_ids"]])
    with torch.no_grad():
        state = teacher(input_ids=ids, output_hidden_states=True).hidden_states[EXIT]
        expected = models.rms_normalize(state, teacher.config.rms_norm_eps).double() @ b \
            @ teacher.get_output_embeddings().weight.double().T
        got = proxy(input_ids=ids).logits
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=0)


def test_quality_numbers_are_saved_and_gamma_spends_the_budget(built):
    _, proxy, meta = built
    saved = json.loads((proxy / "distillgame_proxy.json").read_text())
    assert saved == meta and saved["num_layers"] == EXIT and saved["dtype"] == "float32"
    q = saved["quality"]
    for key in ("teacher_nll", "proxy_nll", "argmax_agreement", "kl_teacher_proxy", "gamma_at_budget",
                "kl_poe_at_gamma", "poe_argmax_agreement"):
        assert math.isfinite(q[key]), key
    assert q["holdout_positions"] == 4 * FIT["tokens"]
    assert q["kl_teacher_proxy"] > 0 and 0 <= q["argmax_agreement"] <= 1
    assert q["teacher_nll"] < q["proxy_nll"] + q["kl_teacher_proxy"] + 1.0  # both scored on the teacher's tokens
    assert 0 < q["gamma_at_budget"] < 1
    assert q["kl_poe_at_gamma"] == pytest.approx(models.DEFAULT_KL_BUDGET, rel=0.02)


def test_exit_layer_outside_the_teacher_is_refused(built, tmp_path):
    teacher, _, _ = built
    for bad in (0, LAYERS, LAYERS + 1):
        with pytest.raises(ValueError, match=rf"exit layer must be in 1\.\.{LAYERS - 1}"):
            build_proxy(teacher, bad, tmp_path / f"bad{bad}", **FIT)
        assert not (tmp_path / f"bad{bad}").exists()
    assert cli.main(["proxy", "--teacher", str(teacher), "--layer", "0", "--out", str(tmp_path / "cli")]) == 2


def test_a_teacher_without_chat_template_gets_the_plain_question_format(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    prompts = models.lens_prompts(tok, 1, general=("Name three colours.",))
    texts = [tok.decode(p) for p in prompts]
    assert texts[0].startswith("Question: ") and texts[0].endswith("\nAnswer: ")
    assert texts[1] == "Question: Name three colours.\nAnswer: "


def test_the_command_parses(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["proxy", "--help"])
    assert exit_.value.code == 0
    assert "--layer" in capsys.readouterr().out
