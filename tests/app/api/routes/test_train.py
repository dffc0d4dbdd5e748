"""The training-job API end to end: real `python -m training` processes on the tiny synthetic CIFAR-10."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.control.jobs import processes
from app.control.jobs.sqlite_store import SQLiteJobStore
from app.factory import create_app
from tests.support import images
from tests.support.checkpoints import make_checkpoint
from tests.support.net import free_port
from tests.support.service import ADMIN, ADMIN_TOKEN
from tests.support.training_api import FINISHED, TINY_JOB, job, job_settings, wait_for_status, wait_ready
from tests.support.waiting import wait_until
from training.config import RECIPES


@contextmanager
def predicting(client: TestClient) -> Iterator[list[tuple[int, str | None]]]:
    """Send predictions back to back from another thread; yields the (status, model_version) answers."""
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()
    image = images.png(32, 32)

    def loop() -> None:
        while not stop.is_set():
            response = client.post("/predict", files={"file": ("red.png", image, "image/png")})
            answers.append((response.status_code, response.json().get("model_version")))
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_job_trains_registers_and_is_promoted_while_predictions_keep_flowing(
    tmp_path: Path, synthetic_cifar10: Path
) -> None:
    settings = job_settings(tmp_path / "state", synthetic_cifar10, make_checkpoint(tmp_path / "serving", test_accuracy=0.0))
    with TestClient(create_app(settings)) as client:
        before = wait_ready(client)
        with predicting(client) as answers:
            response = client.post("/train", json=TINY_JOB, headers=ADMIN)
            assert response.status_code == 202, response.text
            created = response.json()
            assert response.headers["location"] == f"/train/{created['id']}"
            assert created["status"] in ("queued", "running") and created["progress"]["epochs"] == 2
            assert created["params"]["arch"] == "resnet18" and created["params"]["lr"] is None

            second = client.post("/train", headers=ADMIN)
            assert second.status_code == 409 and created["id"] in second.json()["detail"]

            epochs_seen: list[int] = []

            def finished() -> dict | None:
                current = job(client, created["id"])
                epochs_seen.append(current["progress"]["epoch"])
                return current if current["status"] in FINISHED else None

            current = wait_until(finished, what="the job to finish")
            wait_until(lambda: answers and answers[-1][1] != before, what="a prediction from the new model")

        assert current["status"] == "succeeded", current
        assert current["error"] is None and current["started_at"] and current["finished_at"]
        assert epochs_seen == sorted(epochs_seen) and 1 in epochs_seen and current["progress"]["epoch"] == 2
        final = [json.loads(line) for line in (tmp_path / "state" / "runs" / created["id"] / "metrics.jsonl")
                 .read_text().splitlines() if '"final"' in line][-1]
        result = current["result"]
        assert result["promoted"] and result["test_accuracy"] == final["test_accuracy"]
        assert result["model_version"].startswith("resnet18-") and result["model_version"] != before

        assert client.get("/model").json()["version"] == result["model_version"]
        assert [status for status, _ in answers] == [200] * len(answers)
        assert {before, result["model_version"]} <= {version for _, version in answers}

        models = client.get("/models").json()
        assert models["current"] == models["serving"] == result["model_version"]
        assert models["versions"][0]["source_job"] == created["id"]
        registered = tmp_path / "state" / "registry" / "versions" / result["model_version"]
        assert (registered / "model.safetensors").is_file()

        assert [j["id"] for j in client.get("/train", headers=ADMIN).json()] == [created["id"]]
        logs = client.get(f"/train/{created['id']}/logs", headers=ADMIN)
        assert logs.status_code == 200 and "epoch   2/2" in logs.text
        assert len(client.get(f"/train/{created['id']}/logs?tail=1", headers=ADMIN).text.splitlines()) == 1
        finished = client.delete(f"/train/{created['id']}", headers=ADMIN)
        assert finished.status_code == 409 and "already finished" in finished.json()["detail"]
        assert client.post(f"/train/{created['id']}/resume", headers=ADMIN).status_code == 409


def test_if_better_keeps_a_serving_model_that_scored_higher(tmp_path: Path, synthetic_cifar10: Path) -> None:
    settings = job_settings(tmp_path / "state", synthetic_cifar10, make_checkpoint(tmp_path / "serving", test_accuracy=1.0))
    with TestClient(create_app(settings)) as client:
        before = wait_ready(client)
        job_id = client.post("/train", json=TINY_JOB | {"epochs": 1}, headers=ADMIN).json()["id"]
        done = wait_for_status(client, job_id, *FINISHED)
        assert done["status"] == "succeeded" and done["result"]["promoted"] is False, done
        assert done["result"]["test_accuracy"] < 1.0
        assert client.get("/model").json()["version"] == before
        assert [m["version"] for m in client.get("/models").json()["versions"]] == [done["result"]["model_version"]]


def test_cancel_stops_the_training_process_and_keeps_its_files(tmp_path: Path, synthetic_cifar10: Path) -> None:
    settings = job_settings(tmp_path / "state", synthetic_cifar10, tmp_path / "no-weights")
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/train", json=TINY_JOB | {"epochs": 50}, headers=ADMIN).json()["id"]
        pid, started, _ = SQLiteJobStore(tmp_path / "state" / "jobs.db").process(job_id)
        metrics = tmp_path / "state" / "runs" / job_id / "metrics.jsonl"
        wait_until(metrics.is_file, what="training to start")  # stopped mid-run, not while starting up
        assert processes.is_alive(pid, started)
        cancelled = client.delete(f"/train/{job_id}", headers=ADMIN)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert not processes.is_alive(pid, started)
        assert job(client, job_id)["status"] == "cancelled"
        assert (tmp_path / "state" / "runs" / job_id / "train.log").is_file()
        # The slot is free again.
        assert client.post("/train", json={"epochs": 0}, headers=ADMIN).status_code == 422


def test_a_missing_dataset_fails_the_job_with_what_to_do(tmp_path: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "nothing-here", tmp_path / "no-weights")
    with TestClient(create_app(settings)) as client:
        response = client.post("/train", headers=ADMIN)
        assert response.status_code == 202
        failed = job(client, response.json()["id"])
        assert failed["status"] == "failed" and "APP_DATA_DIR" in failed["error"]
        assert "cifar-10-batches-py" in failed["error"] and client.get("/healthz").status_code == 200
        # A failed job does not hold the one-job slot.
        assert client.post("/train", headers=ADMIN).status_code == 202


@pytest.mark.server
def test_an_api_crash_interrupts_the_job_and_resume_finishes_it(tmp_path: Path, synthetic_cifar10: Path) -> None:
    settings = job_settings(tmp_path / "state", synthetic_cifar10, tmp_path / "no-weights")
    env = os.environ | {f"APP_{name.upper()}": str(value) for name, value in settings.model_dump().items()
                        if value is not None and name != "admin_token"} | {"APP_ADMIN_TOKEN": ADMIN_TOKEN}
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN, timeout=10) as remote:
            wait_until(lambda: _answers(remote), what="the API subprocess to listen")
            job_id = remote.post("/train", json=TINY_JOB).json()["id"]
            wait_until(lambda: remote.get(f"/train/{job_id}").json()["progress"]["epoch"] >= 1, what="epoch 1")
            pid, started, _ = SQLiteJobStore(tmp_path / "state" / "jobs.db").process(job_id)
            # Both planes at once, the serving process and its control plane (one process group), with no
            # shutdown handler: the training process, in a session of its own, is orphaned.
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()
        assert processes.is_alive(pid, started)

        with TestClient(create_app(settings)) as client:
            interrupted = job(client, job_id)
            assert interrupted["status"] == "interrupted" and "resume" in interrupted["error"]
            assert not processes.is_alive(pid, started)
            resumed = client.post(f"/train/{job_id}/resume", headers=ADMIN)
            assert resumed.status_code == 202 and resumed.json()["status"] == "running"
            done = wait_for_status(client, job_id, *FINISHED)
            assert done["status"] == "succeeded" and done["progress"]["epoch"] == 2, done
            assert done["result"]["promoted"]  # nothing was served, so if-better promotes
            logs = client.get(f"/train/{job_id}/logs", headers=ADMIN).text
            assert "# resuming: " in logs and "--resume" in logs
    finally:
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()


def _answers(remote: httpx.Client) -> bool:
    try:
        return remote.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def idle_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tmp_path / "no-weights")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/train"), ("post", "/train"), ("get", "/train/x"), ("get", "/train/x/logs"), ("delete", "/train/x"),
    ("post", "/train/x/resume"), ("post", "/admin/promote/x"),
])
def test_admin_auth(idle_client: TestClient, method: str, path: str) -> None:
    call = getattr(idle_client, method)
    assert call(path).status_code == 401
    assert call(path, headers={"Authorization": "Bearer wrong-token-of-some-length"}).status_code == 403
    assert call(path, headers=ADMIN).status_code not in (401, 403)


def test_admin_routes_are_disabled_without_a_token(tmp_path: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tmp_path / "no-weights", admin_token=None)
    with TestClient(create_app(settings)) as client:
        response = client.post("/train", headers=ADMIN)
        assert response.status_code == 403 and "APP_ADMIN_TOKEN" in response.json()["detail"]
        assert client.get("/train", headers=ADMIN).status_code == 403


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/train/nope"), ("get", "/train/nope/logs"), ("delete", "/train/nope"), ("post", "/train/nope/resume"),
])
def test_unknown_jobs_are_404(idle_client: TestClient, method: str, path: str) -> None:
    response = getattr(idle_client, method)(path, headers=ADMIN)
    assert response.status_code == 404 and "nope" in response.json()["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({"epochs": 0}, "epochs"), ({"arch": "vgg16"}, "arch"), ({"lr": "fast"}, "lr"), ({"gpus": 64}, "gpus"),
    ({"batch_size": 15, "gpus": 2}, "gpus"), ({"epochs": 1}, "warmup_epochs"),
    ({"learning_rate": 0.1}, "learning_rate"),
])
def test_impossible_parameters_are_422_naming_the_field(idle_client: TestClient, body: dict, field: str) -> None:
    response = idle_client.post("/train", json=body, headers=ADMIN)
    assert response.status_code == 422 and f"body.{field}" in response.json()["detail"]
    assert idle_client.get("/train", headers=ADMIN).json() == []


@pytest.mark.parametrize("limit", [0, 2**63, 2**70])
def test_a_job_list_limit_outside_what_the_store_takes_is_422(idle_client: TestClient, limit: int) -> None:
    response = idle_client.get(f"/train?limit={limit}", headers=ADMIN)
    assert response.status_code == 422 and "limit" in response.json()["detail"]


def test_a_body_that_names_a_recipe_gets_that_recipes_defaults(idle_client: TestClient) -> None:
    response = idle_client.post("/train", json={"recipe": "cpu", "epochs": 30}, headers=ADMIN)
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert params["epochs"] == 30
    assert all(params[name] == value for name, value in RECIPES["cpu"].items() if name != "epochs"), params


def test_a_replica_that_does_not_run_jobs_says_which_does(tmp_path: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tmp_path / "no-weights", run_jobs=False,
                            jobs_url="http://trainer:8000")
    with TestClient(create_app(settings)) as client:
        response = client.post("/train", headers=ADMIN)
        assert response.status_code == 503 and "http://trainer:8000" in response.json()["detail"]
        assert "APP_RUN_JOBS=false" in response.json()["detail"]
        # No control plane here, so no job store either: reading jobs is the control plane's too.
        listing = client.get("/train", headers=ADMIN)
        assert listing.status_code == 503 and "http://trainer:8000" in listing.json()["detail"]
        assert client.get("/healthz").json()["job_runner"] == "off"


def test_a_smoke_run_on_part_of_the_test_set_is_never_promoted_by_itself(tmp_path: Path,
                                                                         synthetic_cifar10: Path) -> None:
    # The case: a one-image test set can score 1.0 and would have replaced any served model.
    serving = make_checkpoint(tmp_path / "serving", test_accuracy=0.0)
    settings = job_settings(tmp_path / "state", synthetic_cifar10, serving, promote="always")
    with TestClient(create_app(settings)) as client:
        before = wait_ready(client)
        job_id = client.post("/train", json=TINY_JOB | {"epochs": 1, "test_limit": 1}, headers=ADMIN).json()["id"]
        done = wait_for_status(client, job_id, *FINISHED)
        assert done["status"] == "succeeded" and done["result"]["promoted"] is False, done
        assert "1 of the 10000 test images" in done["result"]["reason"]
        assert client.get("/model").json()["version"] == before
