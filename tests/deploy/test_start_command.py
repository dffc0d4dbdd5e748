"""The container's start command, run here as Docker would run it, minus Docker (tests/deploy/container.py):
the CPU variant's `api` service with APP_WEIGHTS at a random-init resnet18. The tests wait for /readyz,
send a PNG to /predict, run docs/deploy.md's curl examples and the image's HEALTHCHECK against it, and stop it
with SIGTERM as `docker stop` does."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.deploy.compose_model import project
from tests.deploy.container import container_environment, running
from tests.deploy.dockerfile_model import run_healthcheck
from tests.support import docs
from tests.support.checkpoints import make_checkpoint

pytestmark = pytest.mark.server
# docker compose's stop_grace_period: what the server gets between SIGTERM and SIGKILL.
STOP_GRACE_S = int(project("docker-compose.yml")["services"]["api"]["stop_grace_period"].removesuffix("s"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    tmp_path = tmp_path_factory.mktemp("container")
    api = project("docker-compose.yml", "docker-compose.cpu.yml")["services"]["api"]
    weights = make_checkpoint(tmp_path / "weights" / "resnet18")
    with running(container_environment(api, tmp_path, weights), tmp_path / "app") as started:
        yield started.url, started.process, started.log


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serves_a_prediction(service: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _, log = service
    response = httpx.post(f"{url}/predict", files={"file": ("red.png", small_png(), "image/png")}, timeout=30)
    assert response.status_code == 200, f"{response.status_code} {response.text}\n{log.read_text()}"
    prediction = response.json()
    assert prediction["label"] in prediction["probabilities"]


def docker_curl_examples() -> list[str]:
    """The curl lines of docs/deploy.md's Docker section that need neither a GPU nor a token."""
    section = docs.section(docs.page("docs/deploy.md"), "## Deploy with Docker")
    return [line for line in section.splitlines()
            if line.startswith("curl ") and re.search(r"/(readyz|predict)\b", line)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_deploy_pages_curl_examples_work(service: tuple[str, subprocess.Popen[bytes], Path],
                                       tmp_path: Path) -> None:
    url, _, log = service
    examples = docker_curl_examples()
    assert any("/predict" in line for line in examples) and any("/readyz" in line for line in examples)
    for line in examples:
        command = shlex.split(line.replace("http://localhost:8000", url))
        for argument in command:
            if argument.startswith("file=@"):
                (tmp_path / argument.removeprefix("file=@")).write_bytes(small_png())
        result = subprocess.run([*command, "-o", "body", "-w", "%{http_code}"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        body = (tmp_path / "body").read_text()
        assert result.stdout == "200", f"{line}: HTTP {result.stdout} {body}\n{log.read_text()}"
        if "/predict" in line:
            assert json.loads(body)["label"]


def test_the_image_healthcheck_passes(service: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _, _ = service
    assert run_healthcheck(int(url.rsplit(":", 1)[1])) == 0


def test_stops_within_the_grace_period_on_sigterm(service: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    _, process, log = service
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_GRACE_S} s after SIGTERM; docker would SIGKILL it:\n{log.read_text()}")
    # uvicorn shuts down cleanly, then re-raises the signal, so the exit status may say SIGTERM.
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
