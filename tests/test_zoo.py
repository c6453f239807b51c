"""The committed CPU-scale zoo: checkpoint shape, reported accuracies, reproducible
builds, and a defended request served by the zoo's teacher and proxy."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import pytest

from distillgame import tasks
from distillgame.bench.zoo.build import ZOO_DIR, ZooConfig, build_zoo

MODELS = ("teacher", "proxy", "student-base")
MiB = 1024 * 1024


def _config(name: str) -> dict:
    return json.loads((ZOO_DIR / name / "config.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", MODELS)
def test_zoo_checkpoint_is_a_small_bf16_llama_vllm_can_load(name: str):
    folder = ZOO_DIR / name
    cfg = _config(name)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "bfloat16"
    # vLLM's CPU attention supports head sizes 32, 64, 80, ...
    assert cfg["head_dim"] == 64 == cfg["hidden_size"] // cfg["num_attention_heads"]
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 25 * MiB
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).exists()


def test_zoo_models_share_one_digit_split_tokenizer_and_differ_in_shape():
    hashes = {_sha(ZOO_DIR / n / "tokenizer.json") for n in MODELS}
    assert len(hashes) == 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ZOO_DIR / "teacher")
    pieces = tok.convert_ids_to_tokens(tok("1234 + 56 = 1290", add_special_tokens=False)["input_ids"])
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p.lstrip("Ġ")) == 1 for p in digits) and len(digits) == 10
    shapes = {n: (_config(n)["hidden_size"], _config(n)["num_hidden_layers"]) for n in MODELS}
    assert len(set(shapes.values())) == 3
    assert shapes["proxy"][0] < shapes["teacher"][0] and shapes["proxy"][1] < shapes["teacher"][1]
    assert {_config(n)["vocab_size"] for n in MODELS} == {len(tok)}


def test_reported_accuracies_meet_the_zoo_contract():
    report = json.loads((ZOO_DIR / "results.json").read_text())
    acc = {n: m["accuracy"] for n, m in report["models"].items()}
    assert report["split"] == "test" and all(m["n"] >= 500 for m in report["models"].values())
    assert acc["teacher"] >= 0.60
    assert acc["proxy"] <= acc["teacher"] / 2
    assert acc["student-base"] <= 0.10
    # Every model was scored on the same problems.
    assert len({m["problems_digest"] for m in report["models"].values()}) == 1
    digest = tasks.problems_digest(tasks.load_problems(report["task"], "test", n=report["models"]["teacher"]["n"]))
    assert report["models"]["teacher"]["problems_digest"] == digest


def test_zoo_build_is_reproducible_with_fixed_seeds(tmp_path: Path):
    """Two tiny builds with the same seeds give byte-identical tokenizer and weights;
    a different model seed gives different weights."""

    def tiny(out: Path, seed: int = 0) -> ZooConfig:
        cfg = ZooConfig(out_dir=out).scaled(0.004)
        cfg.task_train_n = cfg.arith_train_n = 300
        for spec in (cfg.teacher, cfg.proxy, cfg.student):
            spec.eval_n, spec.seed = 5, seed
        return cfg

    build_zoo(tiny(tmp_path / "a"))
    build_zoo(tiny(tmp_path / "b"))
    build_zoo(tiny(tmp_path / "c", seed=1), only=("proxy",))
    for name in MODELS:
        assert _sha(tmp_path / "a" / name / "tokenizer.json") == _sha(tmp_path / "b" / name / "tokenizer.json")
        assert _sha(tmp_path / "a" / name / "model.safetensors") == _sha(tmp_path / "b" / name / "model.safetensors")
    assert _sha(tmp_path / "a" / "proxy" / "model.safetensors") != _sha(tmp_path / "c" / "proxy" / "model.safetensors")
    log = json.loads((tmp_path / "a" / "build_log.json").read_text())
    assert [e["model"] for e in log["train_log"]][0] == "teacher"


@pytest.fixture(scope="module")
def defended_zoo_engine():
    from vllm import LLM

    from distillgame.engine import EngineConfig, prepare_environment

    prepare_environment()
    cfg = EngineConfig(
        teacher=str(ZOO_DIR / "teacher"),
        proxy=str(ZOO_DIR / "proxy"),
        max_model_len=512,
        max_num_seqs=32,
        memory_share=0.05,
    )
    llm = LLM(**cfg.engine_kwargs())
    yield llm
    del llm
    gc.collect()


def test_zoo_teacher_and_proxy_serve_a_defended_poe_request(defended_zoo_engine):
    from vllm import SamplingParams

    from distillgame.plugins.reference import ReferenceModels

    problem = tasks.load_problems("gsm-symbolic-easy", "test", n=1)[0]
    prompt = tasks.build_prompt(problem, "gsm-symbolic-easy")
    defense = {"mode": "poe", "gamma": 0.65}
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, extra_args={"distillgame": defense})
    out = defended_zoo_engine.generate([prompt], params, use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    assert len(tokens) == 8

    ref = ReferenceModels(ZOO_DIR / "teacher", ZOO_DIR / "proxy")
    context = list(out.prompt_token_ids)
    for step, token in enumerate(tokens):
        released = ref.next_token_logprobs(context, defense)
        # Greedy decoding of the released (PoE) distribution, step by step.
        assert token == int(released.argmax()), f"step {step}"
        reported = out.outputs[0].logprobs[step][token].logprob
        assert reported == pytest.approx(float(released[token]), abs=0.05)
        context.append(token)


def test_eval_path_scores_the_zoo_teacher_like_the_report(defended_zoo_engine, tmp_path: Path):
    from distillgame.evaluate import evaluate

    summary = evaluate(
        str(ZOO_DIR / "teacher"), "gsm-symbolic-easy", "test", 40, tmp_path, max_tokens=160, llm=defended_zoo_engine
    )
    assert summary["n"] == 40 and (tmp_path / "results.jsonl").exists()
    recorded = {}
    with (ZOO_DIR / "eval" / "teacher" / "results.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            recorded[row["id"]] = row["correct"]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    agree = sum(recorded[r["id"]] == r["correct"] for r in rows)
    # Same greedy path, same problems; batch composition may flip a rare near-tie.
    assert agree >= 38
    assert summary["accuracy"] >= 0.5


def test_chat_path_renders_the_same_prompt_for_the_zoo(defended_zoo_engine):
    """The zoo's chat template turns the user message into the base prompt, so the
    chat code path (used for instruct models) gives the same greedy completions."""
    from distillgame.evaluate import generate

    problems = tasks.load_problems("gsm-symbolic-easy", "test", n=6)
    plain = generate(defended_zoo_engine, problems, "gsm-symbolic-easy", max_tokens=96)
    chat = generate(defended_zoo_engine, problems, "gsm-symbolic-easy", max_tokens=96, chat=True)
    assert chat == plain
    assert sum(tasks.is_correct(t, p.answer) for t, p in zip(plain, problems)) >= 3
