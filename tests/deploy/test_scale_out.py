"""docker-compose.scale.yml's `control`, `api` and `api-replica`, started from their commands on this machine
(tests/deploy/container.py) with their compose settings and one shared registry folder (and the control
plane's state), as the shared volumes give them; then, where nginx is installed, deploy/nginx.conf in front.

Nothing here trains: the control plane's data volume holds no CIFAR-10, so a job fails at once, before any
process starts (it is still a job in the control plane's database, which both serving services show, since
they forward the job API to it), and a POST /train with an invalid body gets 422 from the control plane."""

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
from tests.support.net import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server
TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
INVALID_JOB = {"epochs": 0}


Cluster = tuple[RunningService, RunningService, Path, RunningService]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("scale")
    services = project("docker-compose.yml", "docker-compose.scale.yml")["services"]
    weights = make_checkpoint(tmp_path / "weights" / "resnet18")
    volumes = tmp_path / "volumes"  # one folder per named volume, seen by all
    control_port = free_port()
    # The compose name `control` is this machine's loopback here.
    extra = {"APP_ADMIN_TOKEN": TOKEN, "APP_CONTROL_URL": f"http://127.0.0.1:{control_port}"}
    with running(container_environment(services["control"], volumes, weights, extra), tmp_path / "control",
                 services["control"], control_port) as control, \
            running(container_environment(services["api"], volumes, weights, extra), tmp_path / "api") as api, \
            running(container_environment(services["api-replica"], volumes, weights, extra),
                    tmp_path / "replica") as replica:
        yield api, replica, tmp_path, control


def test_every_serving_service_forwards_training_jobs_to_the_one_control_plane(cluster: Cluster) -> None:
    api, replica, _, control = cluster
    for service in (api, replica):
        validated = httpx.post(f"{service.url}/train", json=INVALID_JOB, headers=ADMIN, timeout=30)
        assert validated.status_code == 422, validated.text  # the control plane's validation
    assert '"path": "/train"' in control.log.read_text()
    for service in (api, replica, control):  # what each serving service last heard from the control plane
        wait_until(lambda s=service: httpx.get(f"{s.url}/healthz", timeout=30).json()["job_runner"] == "runner",
                   what=f"{service.url} to report the control plane's runner")


def test_a_job_created_through_one_replica_is_seen_through_the_other(cluster: Cluster) -> None:
    api, replica, _, _ = cluster
    created = httpx.post(f"{api.url}/train", json={}, headers=ADMIN, timeout=30)
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "failed" and "APP_DATA_DIR" in job["error"], job  # no data: no process started
    seen = httpx.get(f"{replica.url}/train/{job['id']}", headers=ADMIN, timeout=30)
    assert seen.status_code == 200, seen.text
    assert seen.json() == job
    listings = [httpx.get(f"{service.url}/train", headers=ADMIN, timeout=30).json() for service in (api, replica)]
    assert job["id"] in [listed["id"] for listed in listings[0]] and listings[0] == listings[1]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_nginx_training_reaches_the_control_plane_and_predictions_reach_both_replicas(
    cluster: Cluster,
) -> None:
    runner, replica, tmp_path, control = cluster
    with running_nginx(tmp_path / "nginx", runner.port, replica.port, control.port) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        statuses = {client.post("/train", json=INVALID_JOB, headers=ADMIN).status_code for _ in range(6)}
        assert statuses == {422}, "a POST /train did not reach the control plane"
        for _ in range(10):
            response = client.post("/predict", files={"file": ("image.png", images.png(), "image/png")})
            assert response.status_code == 200, response.text
    for service in (runner, replica):
        assert '"path": "/predict"' in service.log.read_text(), f"no prediction reached {service.url}"
