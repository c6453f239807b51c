"""Defaults that come from the model: a 512-position teacher starts without flags; no chat template is a 400.

One real ``distillgame serve`` process on a tiny random pair whose configs say
512 positions and whose tokenizer has no chat template, started without
``--max-model-len`` and without a policy (the first thing a new user runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest_server import ServerProcess
from tiny_models import make_llama, make_tokenizer

POSITIONS = 512


def _with_positions(folder: Path, positions: int) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def pair_512(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair512")
    tok = make_tokenizer()
    tok.chat_template = None
    teacher = _with_positions(make_llama(root / "teacher", tok, layers=2, seed=0), POSITIONS)
    proxy = _with_positions(make_llama(root / "proxy", tok, layers=1, seed=1), POSITIONS)
    for folder in (teacher, proxy):
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return teacher, proxy


class _NoFlagsServer(ServerProcess):
    """``distillgame serve --teacher --proxy`` with nothing else a user would have to know."""

    def start(self, extra_args: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "distillgame.cli", "serve", *(extra_args or []),
               "--port", str(self.port), "--memory-share", "0.1", "--kv-cache-gib", "0.1", "--max-num-seqs", "4"]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def server_512(pair_512, tmp_path_factory):
    teacher, proxy = pair_512
    server = _NoFlagsServer(tmp_path_factory.mktemp("serve512"))
    server.start(["--teacher", str(teacher), "--proxy", str(proxy)])
    try:
        server.wait_ready(timeout=420)
        yield server
    finally:
        server.stop()


def test_max_model_len_defaults_to_what_both_models_support(pair_512, tmp_path):
    from distillgame.server.cli import MAX_MODEL_LEN_CAP, default_max_model_len

    teacher, proxy = pair_512
    assert default_max_model_len(str(teacher), str(proxy)) == POSITIONS
    # The smaller of the two wins, and the server's cap bounds a long-context model.
    tok = make_tokenizer()
    short = _with_positions(make_llama(tmp_path / "short", tok, layers=1), 256)
    long = _with_positions(make_llama(tmp_path / "long", tok, layers=1), 32768)
    assert default_max_model_len(str(teacher), str(short)) == 256
    assert default_max_model_len(str(long), str(long)) == MAX_MODEL_LEN_CAP


def test_a_512_position_teacher_serves_without_flags(server_512):
    r = httpx.post(f"{server_512.base_url}/v1/completions",
                   json={"model": "teacher", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    # The context is the models' 512 positions, not the old fixed 2048: a longer prompt is a 400 that says so.
    r = httpx.post(f"{server_512.base_url}/v1/completions",
                   json={"model": "teacher", "prompt": "fox " * (POSITIONS + 50), "max_tokens": 4})
    assert r.status_code == 400
    assert str(POSITIONS) in r.json()["error"]["message"], r.json()


def test_chat_without_a_template_is_an_openai_shaped_400(server_512):
    import openai

    r = httpx.post(f"{server_512.base_url}/v1/chat/completions",
                   json={"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "chat template" in error["message"] or "chat_template" in error["message"], error
    client = openai.OpenAI(base_url=f"{server_512.base_url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_budget_is_shown_only_where_it_was_calibrated(server_512):
    # Another pair than the embedded one: the default gamma's budget is unknown there.
    body = httpx.get(f"{server_512.base_url}/v1/defense").json()
    assert body["mode"] == "poe" and "gamma" in body
    assert "kl_budget" in body and body["kl_budget"] is None


def test_default_tier_states_its_budget_next_to_gamma():
    from distillgame.server.policy import DEFAULT_GAMMA, DEFAULT_KL_BUDGET, default_policy

    view = default_policy().authenticate(None).public()
    assert view["mode"] == "poe" and view["gamma"] == DEFAULT_GAMMA
    assert view["kl_budget"] == DEFAULT_KL_BUDGET
