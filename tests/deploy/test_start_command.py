"""The container's start command, run here as Docker would run it, minus Docker.

The command is the Dockerfile's CMD, word for word, except `python` (this interpreter) and the port (a
free one); the environment is the image's ENV plus the CPU variant's compose settings, with the paths
moved to temporary folders and APP_WEIGHTS at a random-init resnet18. The test waits for /readyz, sends a
PNG to /predict, runs the README's curl examples and the image's HEALTHCHECK against it, and stops it
with SIGTERM as `docker stop` does.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import make_checkpoint
from tests.deploy.compose_model import REPO_ROOT, project
from tests.deploy.dockerfile_model import container_command, final_stage, run_healthcheck
from tests.deploy.dockerfile_model import env as dockerfile_env
from tests.deploy.net import free_port

pytestmark = pytest.mark.skipif(
    not (REPO_ROOT / "app" / "__main__.py").is_file(),
    reason="app/__main__.py (the `python -m app` wrapper) does not exist yet",
)
READY_TIMEOUT_S = 180
# docker compose's stop_grace_period: what the server gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 30


def container_environment(tmp_path: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    image = dockerfile_env(final_stage())
    image.pop("PATH")
    service = project("docker-compose.yml", "docker-compose.cpu.yml")["services"]["api"]["environment"]
    environment |= image | {key: value for key, value in service.items() if value is not None}
    for key in ("APP_STATE_DIR", "APP_REGISTRY_DIR", "APP_DATA_DIR"):
        environment[key] = str(tmp_path / key.lower())
    environment["APP_WEIGHTS"] = str(make_checkpoint(tmp_path / "weights" / "resnet18"))
    return environment


def start_command(port: int) -> list[str]:
    command = container_command(final_stage())
    command[0] = sys.executable
    command[command.index("--port") + 1] = str(port)
    return command


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    tmp_path = tmp_path_factory.mktemp("container")
    port = free_port()
    log = tmp_path / "service.log"
    workdir = tmp_path / "app"  # the image's WORKDIR holds only weights/: nothing imported from the checkout
    workdir.mkdir()
    with open(log, "wb") as output:
        process = subprocess.Popen(start_command(port), cwd=workdir, env=container_environment(tmp_path),
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the service exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"/readyz not 200 in {READY_TIMEOUT_S} s:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield url, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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


def readme_curl_examples() -> list[str]:
    """The curl lines of the README's Docker section that need neither a GPU nor a token."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Deploy with Docker"):]
    return [line for line in section.splitlines()
            if line.startswith("curl ") and re.search(r"/(readyz|predict)\b", line)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_examples_work(service: tuple[str, subprocess.Popen[bytes], Path],
                                       tmp_path: Path) -> None:
    url, _, log = service
    examples = readme_curl_examples()
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
    assert process.returncode == 0, log.read_text()
