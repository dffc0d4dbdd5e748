"""docker-compose.scale.yml's `api` and `api-replica`, started from the image's command on this machine
(tests/deploy/container.py) with their compose settings and one shared state and registry folder, as the
shared volumes give them; then, where nginx is installed, deploy/nginx.conf in front of both.

Nothing here starts a training run: POST /train carries an invalid body, so the job runner answers 422
(it would accept a valid one), while a replica refuses any POST /train with 503."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import make_checkpoint
from tests.deploy.compose_model import REPO_ROOT, project
from tests.deploy.container import RunningService, container_environment, running
from tests.deploy.load_balancer import NGINX, running_nginx

pytestmark = pytest.mark.skipif(
    not (REPO_ROOT / "app" / "__main__.py").is_file(),
    reason="app/__main__.py (the `python -m app` wrapper) does not exist yet",
)
TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
INVALID_JOB = {"epochs": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, RunningService, Path]]:
    tmp_path = tmp_path_factory.mktemp("scale")
    services = project("docker-compose.yml", "docker-compose.scale.yml")["services"]
    weights = make_checkpoint(tmp_path / "weights" / "resnet18")
    volumes = tmp_path / "volumes"  # one folder per named volume, seen by both
    extra = {"APP_ADMIN_TOKEN": TOKEN}
    with running(container_environment(services["api"], volumes, weights, extra), tmp_path / "api") as runner, \
            running(container_environment(services["api-replica"], volumes, weights, extra),
                    tmp_path / "replica") as replica:
        yield runner, replica, tmp_path


def test_only_the_runner_accepts_training_jobs(cluster: tuple[RunningService, RunningService, Path]) -> None:
    runner, replica, _ = cluster
    refused = httpx.post(f"{replica.url}/train", json={}, headers=ADMIN, timeout=30)
    assert refused.status_code == 503, refused.text
    validated = httpx.post(f"{runner.url}/train", json=INVALID_JOB, headers=ADMIN, timeout=30)
    assert validated.status_code == 422, validated.text


def test_both_read_the_same_job_database(cluster: tuple[RunningService, RunningService, Path]) -> None:
    runner, replica, _ = cluster
    answers = [httpx.get(f"{service.url}/train", headers=ADMIN, timeout=30) for service in (runner, replica)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json() == answers[1].json()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_nginx_training_reaches_the_runner_and_predictions_reach_both(
    cluster: tuple[RunningService, RunningService, Path],
) -> None:
    runner, replica, tmp_path = cluster
    with running_nginx(tmp_path / "nginx", runner.port, replica.port) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        statuses = {client.post("/train", json=INVALID_JOB, headers=ADMIN).status_code for _ in range(6)}
        assert statuses == {422}, "a POST /train reached a replica"
        for _ in range(10):
            response = client.post("/predict", files={"file": ("blue.png", _png(), "image/png")})
            assert response.status_code == 200, response.text
    for service in (runner, replica):
        assert '"path": "/predict"' in service.log.read_text(), f"no prediction reached {service.url}"
