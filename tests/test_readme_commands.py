"""Every command in the README runs as written; every ``distillgame`` command in docs/ parses.

The README's quickstart snippets (curl, the openai SDK, ``distillgame
compare``) are extracted from its fenced code blocks and run verbatim against
a real ``distillgame serve`` started as ``make serve`` starts it (embedded
models, no policy), with only the port changed. ``make serve`` itself is that
server; ``make test`` is this suite. Commands in docs/ are too slow to run here
(benchmarks, training), so each ``distillgame ...`` line there is parsed by the
real argument parser instead: a renamed subcommand or flag fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from conftest_server import FrontEnd, ServerProcess, serving

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DEFAULT_URL = "http://127.0.0.1:8000"


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)]


def shell_commands(body: str) -> list[str]:
    """Commands of a bash block: comments dropped, backslash continuations joined."""
    lines, out = body.replace("\\\n", " ").splitlines(), []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def readme_commands() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"bash": [], "python": []}
    for lang, body in code_blocks(README):
        if lang == "bash":
            found["bash"] += shell_commands(body)
        elif lang == "python":
            found["python"].append(body)
    return found


class _MakeServe(ServerProcess):
    """What ``make serve`` runs (``distillgame serve`` with its defaults), on a free port and a small memory share."""

    def start(self, extra_args: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "distillgame.cli", "serve", "--port", str(self.port),
               "--memory-share", "0.1", "--kv-cache-gib", "0.25", "--max-num-seqs", "4"]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    server = _MakeServe(tmp_path_factory.mktemp("make-serve"))
    server.start()
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()


def _run(args: list[str], server: ServerProcess, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150  # the quickstart and the `vllm serve` recipe
    block, _ = _recipe()
    # The drop-in is the teacher, the proxy, the middleware and the policy: at most 6 lines of command.
    assert len([line for line in block.splitlines() if line.strip()]) <= 6, block
    assert "make serve" in text and "make test" in text
    assert "docs/supported-configurations.md" in text


def test_readme_and_docs_links_point_to_files():
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"


def test_every_docs_page_opens_with_its_question():
    for page in sorted(DOCS.glob("*.md")):
        title, _, rest = page.read_text().partition("\n\n")
        opening = rest.partition("\n\n")[0]
        # A title, then an italic paragraph that asks the page's question.
        assert title.startswith("# ") and opening.startswith("*") and "?" in opening, page.name


def test_readme_curl_commands_answer(make_serve):
    curls = [c for c in readme_commands()["bash"] if c.startswith("curl")]
    assert len(curls) >= 3
    for command in curls:
        result = _run(["bash", "-c", command.replace(DEFAULT_URL, make_serve.base_url)], make_serve)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert "error" not in body, body
        if "/v1/chat/completions" in command:
            assert body["choices"][0]["message"]["content"].strip()
        if "/v1/defense" in command:
            assert body["mode"] == "poe" and body["kl_budget"] == 0.25


def test_readme_sdk_snippet_runs(make_serve):
    snippets = readme_commands()["python"]
    assert snippets
    for code in snippets:
        result = _run([sys.executable, "-c", code.replace(DEFAULT_URL, make_serve.base_url)], make_serve)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()


def test_readme_compare_command_runs():
    commands = [c for c in readme_commands()["bash"] if "distillgame compare" in c]
    assert commands
    for command in commands:
        args = shlex.split(command)
        args[0] = str(Path(sys.executable).parent / "distillgame")
        result = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["undefended"].strip() and report["defended"].strip()
        assert 0.0 <= report["agreement"] <= 1.0 and report["mean_kl"] >= 0.0


def _docs_distillgame_commands() -> list[str]:
    out = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for lang, body in code_blocks(page):
            if lang == "bash":
                out += [c for c in shell_commands(body) if re.match(r"^(\.venv/bin/)?distillgame\s", c)]
    return out


def test_every_distillgame_command_in_the_docs_parses():
    from distillgame.cli import build_parser

    parser = build_parser()
    commands = _docs_distillgame_commands()
    assert len(commands) > 10
    for command in commands:
        command = re.sub(r"\s+#.*$", "", command)  # a trailing comment
        command = re.sub(r"\s*\[[^\]]*\]", "", command)  # optional parts written [--flag]
        args = shlex.split(command)[1:]
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"does not parse: {command} ({exc})")


# ---------------------------------------------------------------- the `vllm serve` recipe, as written

RECIPE_KEY = "sk-standard-example"  # the standard tier of server/policy.example.toml


def _recipe() -> tuple[str, list[str]]:
    """The README's `vllm serve` recipe block and the curl commands that use its key."""
    blocks = [body for lang, body in code_blocks(README) if lang == "bash" and "--middleware" in body]
    assert len(blocks) == 1, "the README has one `vllm serve` recipe"
    curls = [c for c in readme_commands()["bash"] if c.startswith("curl") and RECIPE_KEY in c]
    assert curls
    return blocks[0], curls


@dataclass
class _ReadmeRecipe(FrontEnd):
    """The README's recipe run by bash from the repository root (it names the example policy), on a free port."""

    kind: ClassVar[str] = "vllm"

    def start(self, extra_args: list[str] | None = None) -> None:
        script = self.workdir / "recipe.sh"
        block, _ = _recipe()
        script.write_text(block.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
                          .replace("--port 8000", f"--port {self.port}"))
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(self.workdir / "inductor"))
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(["bash", str(script)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)  # bash and the server it started
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=30)


def test_readme_vllm_serve_recipe_runs_as_written_and_is_defended(tmp_path):
    """The recipe, pasted into bash: its curl answers, with the PoE tier's logprobs, and no key is a 401."""
    import torch
    from transformers import AutoTokenizer

    from distillgame import models
    from distillgame.plugins.reference import ReferenceModels

    _, curls = _recipe()
    with serving(_ReadmeRecipe(tmp_path), timeout=900) as server:
        from distillgame.server.policy import load_policy

        gamma = load_policy(ROOT / "server/policy.example.toml").authenticate(RECIPE_KEY).defense.gamma
        for command in curls:
            result = subprocess.run(["bash", "-c", command.replace(DEFAULT_URL, server.base_url)],
                                    capture_output=True, text=True, timeout=300)
            body = json.loads(result.stdout)
            assert "error" not in body, body
            first = body["choices"][0]["logprobs"]["top_logprobs"][0]
        headers = {"Authorization": f"Bearer {RECIPE_KEY}"}
        assert httpx.get(f"{server.base_url}/v1/defense", headers=headers).json()["mode"] == "poe"
        assert httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 401
    # The first position's top logprobs depend on the prompt only: the PoE reference's, not the teacher's.
    teacher, proxy = models.resolve(None, "teacher"), models.resolve(None, "proxy")
    torch.set_num_threads(1)
    reference = ReferenceModels(teacher, proxy)
    prompt = json.loads(re.search(r"-d '(.*)'", curls[-1]).group(1))["prompt"]
    ids = AutoTokenizer.from_pretrained(teacher)(prompt, add_special_tokens=False)["input_ids"]
    got = sorted(first.values(), reverse=True)
    defended = reference.next_token_logprobs(ids, {"mode": "poe", "gamma": gamma}).topk(len(got)).values.tolist()
    undefended = reference.next_token_logprobs(ids, {"mode": "none"}).topk(len(got)).values.tolist()
    assert max(abs(a - b) for a, b in zip(got, defended)) < 1e-4, (got, defended)
    assert max(abs(a - b) for a, b in zip(got, undefended)) > 1e-2, (got, undefended)
