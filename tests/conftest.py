"""Shared fixtures: tiny model folders made on the fly and the engines shared by a run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

from tiny_models import CORPUS, make_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random teacher (3 layers) and proxy (1 layer, padded vocab) sharing a tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    teacher = make_llama(root / "teacher", tok, layers=3, seed=0)
    proxy = make_llama(root / "proxy", tok, layers=1, seed=1, vocab_pad=40)
    return teacher, proxy


@pytest.fixture(scope="session")
def tiny_traces(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("traces") / "holdout.jsonl"
    with path.open("w") as fh:
        for line in sorted(set(CORPUS)):
            cut = len(line) // 2
            fh.write(json.dumps({"prompt": line[:cut], "completion": line[cut:]}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_grads(tiny_pair, tiny_traces, tmp_path_factory) -> dict[str, Path]:
    """ADS gradients of the tiny proxy and of the tiny teacher, made by the real CLI."""
    from distillgame.cli import main

    out = tmp_path_factory.mktemp("grads")
    teacher, proxy = tiny_pair
    paths = {"proxy": out / "proxy.safetensors", "teacher": out / "teacher.safetensors"}
    for role, model in (("proxy", proxy), ("teacher", teacher)):
        assert main(["ads-grad", "--proxy", str(model), "--traces", str(tiny_traces), "--out", str(paths[role])]) == 0
    return paths


@pytest.fixture(scope="session")
def tiny_llm(tiny_pair, tiny_grads):
    """One defended engine on the tiny pair (PoE and ADS), shared by the engine tests."""
    from distillgame.engine import EngineConfig, build_llm
    from engine_helpers import shutdown

    teacher, proxy = tiny_pair
    llm = build_llm(
        EngineConfig(
            teacher=str(teacher),
            proxy=str(proxy),
            ads_grad=str(tiny_grads["proxy"]),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=16,
            memory_share=0.12,
            disable_log_stats=False,
            # Start the proxy KV caches small so the equivalence tests also cover
            # their growth (the default allocates max_model_len up front).
            extra_defense={"initial_cache_len": 8},
        )
    )
    yield llm
    shutdown(llm)
