"""Shared fixtures: tiny model folders made on the fly and one defended engine per run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

from tiny_models import make_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random teacher (3 layers) and proxy (1 layer, padded vocab) sharing a tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    teacher = make_llama(root / "teacher", tok, layers=3, seed=0)
    proxy = make_llama(root / "proxy", tok, layers=1, seed=1, vocab_pad=40)
    return teacher, proxy
