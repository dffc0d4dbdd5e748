"""docker-compose.scale.yml's `api` and `api-replica`, started from the image's command on this machine
(tests/deploy/container.py) with their compose settings and one shared state and registry folder, as the
shared volumes give them; then, where nginx is installed, deploy/nginx.conf in front of both.

Nothing here trains: the runner's data volume holds no CIFAR-10, so a job created through it fails at once,
before any process starts (it is still a job in the shared database, which is what the replica must see),
and a POST /train with an invalid body gets 422. A replica refuses any POST /train with 503."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.compose_model import project
from tests.deploy.container import RunningService, container_environment, running
from tests.deploy.load_balancer import NGINX, running_nginx
from tests.support import images
from tests.support.checkpoints import make_checkpoint

pytestmark = pytest.mark.server
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


def test_a_job_created_through_the_runner_is_seen_through_the_replica(
    cluster: tuple[RunningService, RunningService, Path],
) -> None:
    runner, replica, _ = cluster
    created = httpx.post(f"{runner.url}/train", json={}, headers=ADMIN, timeout=30)
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "failed" and "APP_DATA_DIR" in job["error"], job  # no data: no process started
    seen = httpx.get(f"{replica.url}/train/{job['id']}", headers=ADMIN, timeout=30)
    assert seen.status_code == 200, seen.text
    assert seen.json() == job
    listings = [httpx.get(f"{service.url}/train", headers=ADMIN, timeout=30).json() for service in (runner, replica)]
    assert job["id"] in [listed["id"] for listed in listings[0]] and listings[0] == listings[1]


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
            response = client.post("/predict", files={"file": ("image.png", images.png(), "image/png")})
            assert response.status_code == 200, response.text
    for service in (runner, replica):
        assert '"path": "/predict"' in service.log.read_text(), f"no prediction reached {service.url}"
