"""A second ``python -m app`` on the same APP_STATE_DIR (issue 13, item 6): it must neither recover nor stop the
first instance's live training job. On another port (and another control port) its control plane stands by and
takes over the jobs when the first stops; on the same port it fails to bind before any start-up work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.control.jobs import processes
from app.control.jobs.sqlite_store import SQLiteJobStore
from tests.support import REPO_ROOT
from tests.support.service import ADMIN, live_environment, live_server
from tests.support.training_api import TINY_JOB
from tests.support.waiting import wait_until


@pytest.mark.server
def test_a_second_instance_stands_by_and_leaves_the_first_ones_job_alone(
        tmp_path: Path, synthetic_cifar10: Path, tiny_checkpoint: Path) -> None:
    state = tmp_path / "state"
    env = live_environment(tiny_checkpoint, APP_STATE_DIR=str(state), APP_DATA_DIR=str(synthetic_cifar10),
                           APP_DATA_SKIP_INTEGRITY_CHECK="true", APP_TRAINING_DEVICE="cpu", APP_REGISTRY_POLL_S="0")
    with live_server(tmp_path, env, wait_ready=False) as first, httpx.Client(headers=ADMIN, timeout=60) as http:
        wait_until(lambda: http.get(f"{first.url}/healthz").json()["job_runner"] == "runner",
                   what="the first control plane to be elected")
        job_id = http.post(f"{first.url}/train", json=TINY_JOB | {"epochs": 10_000}).json()["id"]
        wait_until(lambda: (http.get(f"{first.url}/train/{job_id}").json()["progress"]["epoch"]
                            or 0) >= 1, what="the first epoch")
        pid, started, _ = SQLiteJobStore(state / "jobs.db").process(job_id)

        # The same port: the bind fails first, so nothing of the service starts.
        port = first.url.rsplit(":", 1)[1]
        clash = subprocess.run([sys.executable, "-m", "app", "--port", port], cwd=REPO_ROOT, env=_env(env),
                               capture_output=True, text=True, timeout=300)
        assert clash.returncode != 0 and "already in use" in clash.stderr and "--port" in clash.stderr, clash.stderr
        assert "standby" not in clash.stderr and "elected" not in clash.stderr

        with live_server(tmp_path, env) as second:  # another port, same state directory; serves predictions
            wait_until(lambda: http.get(f"{second.url}/healthz").json()["job_runner"] == "standby",
                       what="the second control plane to stand by")
            assert any("standby: another process holds the lock" in line for line in second.log_lines())
            job = http.get(f"{second.url}/train/{job_id}").json()
            assert job["status"] == "running" and job["error"] is None and processes.is_alive(pid, started)

            first.process.terminate()  # the runner stops: its job is interrupted, and the standby takes over
            first.process.wait(timeout=60)
            assert not processes.is_alive(pid, started)
            wait_until(lambda: http.get(f"{second.url}/healthz").json()["job_runner"] == "runner",
                       what="the standby to be elected")
            assert any("elected to run training jobs" in line for line in second.log_lines())
            resumed = http.post(f"{second.url}/train/{job_id}/resume")
            assert resumed.status_code == 202 and resumed.json()["status"] == "running", resumed.text
            assert http.delete(f"{second.url}/train/{job_id}").json()["status"] == "cancelled"


@pytest.mark.server
def test_several_workers_share_one_control_plane(tmp_path: Path, tiny_checkpoint: Path) -> None:
    env = live_environment(tiny_checkpoint, APP_STATE_DIR=str(tmp_path / "state"), APP_REGISTRY_POLL_S="0")
    with live_server(tmp_path, env, wait_ready=False, command=("-m", "app", "--workers", "2")) as server, \
            httpx.Client(headers=ADMIN, timeout=60) as http:
        wait_until(lambda: any("elected to run training jobs" in line for line in server.log_lines()),
                   what="the control plane to be elected")
        # Whichever worker answers forwards to the same, single control plane.
        for _ in range(6):
            assert http.get(f"{server.url}/train").json() == []
        wait_until(lambda: http.get(f"{server.url}/healthz").json()["job_runner"] == "runner",
                   what="the workers to see the control plane")
        lines = server.log_lines()
        assert sum("elected to run training jobs" in line for line in lines) == 1
        assert not any("standby: another process holds" in line for line in lines)
        assert sum("control plane started on" in line for line in lines) == 1


def _env(app_variables: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | app_variables
