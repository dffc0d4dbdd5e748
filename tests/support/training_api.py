"""Helpers for tests that run real training jobs through the service: tiny settings and following a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from tests.support.net import free_port
from tests.support.service import ADMIN, ADMIN_TOKEN
from tests.support.waiting import wait_until

# One optimiser step per epoch on 16 images, tested on the synthetic set's 50: a job takes seconds on a CPU.
# No test_limit: a run scored on part of the test set is never promoted by itself.
TINY_JOB: dict[str, Any] = {"arch": "resnet18", "epochs": 2, "batch_size": 16, "train_limit": 16,
                            "warmup_epochs": 0, "checkpoint_every": 1, "plots": False,
                            # The backend verification a full run ends with measures every backend for ~45 s;
                            # tests of it run it on its own (tests/training/test_verify_backends.py).
                            "tta": False, "verify_backends": False}
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def job_settings(state_dir: Path, data_dir: Path, weights: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        weights=weights, device="cpu", training_device="cpu", state_dir=state_dir, data_dir=data_dir,
        data_skip_integrity_check=True, admin_token=ADMIN_TOKEN, max_batch_size=4, max_batch_files=4,
        torch_threads=1,
        # The control plane is a process of its own, on a free port (8001 may be another test's); the replica
        # learns of its promotions through the registry, so it polls often.
        control_port=free_port(), registry_poll_s=0.1,
        grpc_port=0,  # no gRPC server: test servers run side by side, and 8081 may be taken
    )
    return Settings(**(values | overrides))


def wait_ready(client: TestClient) -> str:
    """The served model's version, once the service is ready and its control plane answers (or there is none)."""
    def version() -> str | None:
        response = client.get("/readyz")
        if response.status_code != 200 or response.json()["control_plane"] not in ("ready", "off"):
            return None
        return response.json()["model_version"]

    return wait_until(version, what="the service to be ready")


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/train/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(client: TestClient, job_id: str, *statuses: str) -> dict[str, Any]:
    return wait_until(lambda: (j := job(client, job_id))["status"] in statuses and j,
                      what=f"job {job_id} to become {' or '.join(statuses)}")
