"""Two planes, two processes (issue 22): ``python -m app`` starts the control plane as a supervised child; a job
submitted on the serving port runs there; killing it fails no prediction and it is restarted; a control plane
that cannot start never stops the serving process from starting and serving. Real subprocesses, real sockets."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.control.supervisor import settings_environment
from tests.support import images
from tests.support.net import free_port
from tests.support.service import ADMIN, ADMIN_TOKEN, LiveServer, live_environment, live_server
from tests.support.training_api import FINISHED, TINY_JOB
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server

# A mapped file inside one of these packages: the library was imported.
HEAVY_LIBRARY = re.compile(r"/(torch|torchvision|onnxruntime)/")


def control_children(server: LiveServer) -> list[int]:
    """The serving process's children that run ``python -m app.control``."""
    found = []
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"app.control" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except FileNotFoundError:
                continue
    return found


@contextmanager
def predicting(url: str) -> Iterator[list[int]]:
    """Predictions back to back from another thread; yields their statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{url}/predict", files={"file": ("a.png", images.png(), "image/png")})
                statuses.append(response.status_code)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(timeout=60)


def test_two_processes_a_job_from_the_serving_port_and_a_killed_control_plane_restarted(
        tmp_path: Path, synthetic_cifar10: Path, tiny_checkpoint: Path) -> None:
    env = live_environment(tiny_checkpoint, APP_DATA_DIR=str(synthetic_cifar10), APP_DATA_SKIP_INTEGRITY_CHECK="true",
                           APP_TRAINING_DEVICE="cpu", APP_REGISTRY_POLL_S="0.1", APP_PROMOTE="always")
    with live_server(tmp_path, env) as server, httpx.Client(headers=ADMIN, timeout=60) as http:
        [control] = wait_until(lambda: control_children(server), what="the control process")
        wait_until(lambda: http.get(f"{server.url}/healthz").json()["job_runner"] == "runner",
                   what="the control plane to be elected")
        created = http.post(f"{server.url}/train", json=TINY_JOB)
        assert created.status_code == 202 and created.headers["location"] == f"/train/{created.json()['id']}"
        job_id = created.json()["id"]
        done = wait_until(lambda: (j := http.get(f"{server.url}/train/{job_id}").json())["status"] in FINISHED and j,
                          what="the job to finish")
        assert done["status"] == "succeeded" and done["result"]["promoted"], done
        version = done["result"]["model_version"]
        wait_until(lambda: http.get(f"{server.url}/model").json()["version"] == version,
                   what="the serving process to follow the promotion")

        with predicting(server.url) as statuses:
            wait_until(lambda: len(statuses) >= 3, what="predictions to flow")
            os.kill(control, signal.SIGKILL)
            [restarted] = wait_until(lambda: [p for p in control_children(server) if p != control],
                                     what="the supervisor to restart the control plane")
            # The restarted control plane answers the job API again, through the serving port (503 meanwhile).
            listing = wait_until(lambda: (r := http.get(f"{server.url}/train")).status_code == 200 and r,
                                 what="the restarted control plane to answer")
            seen = len(statuses)
            wait_until(lambda: len(statuses) >= seen + 3, what="predictions after the restart")
        assert set(statuses) == {200}, statuses
        assert server.process.poll() is None
        assert [j["id"] for j in listing.json()] == [job_id]  # the job store outlived the process
        assert any("restarting it in" in line for line in server.log_lines())
        # What /readyz says of the control plane is its last probe (every 5 s): it catches up.
        wait_until(lambda: http.get(f"{server.url}/readyz").json()["control_plane"] == "ready",
                   what="/readyz to see the control plane again")
    stopped = Path(f"/proc/{restarted}/cmdline")  # with the serving process, on its SIGTERM
    assert not stopped.exists() or b"app.control" not in stopped.read_bytes()


def test_the_serving_process_starts_and_serves_while_the_control_plane_cannot(
        tmp_path: Path, tiny_checkpoint: Path) -> None:
    closed = free_port()  # nothing listens there: the job database is unreachable
    env = live_environment(tiny_checkpoint, APP_DATABASE_URL=f"postgresql://cifar:secret@127.0.0.1:{closed}/jobs")
    with live_server(tmp_path, env) as server, httpx.Client(headers=ADMIN, timeout=120) as http:
        ready = http.get(f"{server.url}/readyz")
        assert ready.status_code == 200 and ready.json()["control_plane"] != "ready", ready.json()
        assert http.get(f"{server.url}/healthz").json()["job_runner"] == "unknown"
        prediction = http.post(f"{server.url}/predict", files={"file": ("a.png", images.png(), "image/png")})
        assert prediction.status_code == 200
        wait_until(lambda: sum("restarting it in" in line for line in server.log_lines()) >= 2,
                   what="the supervisor to retry the control plane")
        refused = http.post(f"{server.url}/train", json=TINY_JOB)
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert "Predictions are not affected" in refused.json()["detail"]
        assert server.process.poll() is None


def test_the_control_plane_starts_without_torch(tmp_path: Path) -> None:
    """``python -m app.control`` loads no model, so it must not import torch: its supervisor restarts it on the
    cores that serve /predict, where importing torch cost seconds of CPU per restart (the fault benchmark's
    control-killed row; benchmarks/control_start.py). Checked in the live process once it is ready (its job
    store open, the runner elected): no file of torch, torchvision or ONNX Runtime is mapped into it."""
    with live_server(tmp_path, {"APP_ADMIN_TOKEN": ADMIN_TOKEN}, command=("-m", "app.control")) as server:
        mapped = Path(f"/proc/{server.process.pid}/maps").read_text().splitlines()
    heavy = sorted({line.split()[-1] for line in mapped if HEAVY_LIBRARY.search(line)})
    assert not heavy, f"the control plane imported what only a serving process needs: {heavy[:3]}"


def test_a_child_gets_exactly_the_parents_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(state_dir=tmp_path, admin_token=ADMIN_TOKEN, reload_roots=[tmp_path / "a"], run_jobs=True,
                        control_url="http://elsewhere:8001", registry_poll_s=0.5)
    env = settings_environment(settings, {"APP_TYPO": "x", "PATH": "/bin"})
    assert env["APP_STATE_DIR"] == str(tmp_path) and env["APP_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert env["APP_RUN_JOBS"] == "true" and env["APP_REGISTRY_POLL_S"] == "0.5" and env["PATH"] == "/bin"
    assert "APP_TYPO" not in env and "APP_CONTROL_URL" not in env
    for name in [k for k in os.environ if k.startswith("APP_")]:
        monkeypatch.delenv(name)
    for name in [k for k in env if k.startswith("APP_")]:
        monkeypatch.setenv(name, env[name])
    assert Settings().model_dump() == settings.model_copy(update={"control_url": None}).model_dump()


def test_a_frozen_job_database_is_answered_503_with_retry_after_not_500(tmp_path: Path,
                                                                         own_postgres_server) -> None:
    """The store's client-side deadline turns a stalled PostgreSQL into JobStoreUnavailable; the control
    plane's routes answer it as a temporary failure to retry, in the API's error shape."""
    from fastapi.testclient import TestClient

    from app.control.service import create_control_app
    from tests.support.service import ADMIN
    from tests.support.training_api import job_settings

    settings = job_settings(tmp_path / "state", tmp_path / "no-data", tmp_path / "no-weights",
                            database_url=own_postgres_server.create_database())
    with TestClient(create_control_app(settings)) as client:
        assert client.get("/train", headers=ADMIN).status_code == 200
        own_postgres_server.freeze()
        try:
            stalled = client.get("/train", headers=ADMIN)
        finally:
            own_postgres_server.thaw()
        assert stalled.status_code == 503, stalled.text
        assert stalled.headers["retry-after"] and "database" in stalled.json()["detail"]
        assert client.get("/train", headers=ADMIN).status_code == 200
