"""Helpers for tests that run real training jobs through the service: tiny settings and polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from app.config import Settings
from model.checkpoint import save_checkpoint
from model.architectures import build_model

TOKEN = "training-jobs-test-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# One optimiser step per epoch on 16 images, tested on 16: a job takes seconds on a CPU.
TINY_JOB: dict[str, Any] = {"arch": "resnet18", "epochs": 2, "batch_size": 16, "train_limit": 16,
                            "test_limit": 16, "warmup_epochs": 0, "checkpoint_every": 1, "plots": False,
                            "tta": False}


def serving_checkpoint(directory: Path, test_accuracy: float, seed: int = 0) -> Path:
    """A resnet18 checkpoint whose card claims ``test_accuracy``, to steer the if-better policy."""
    torch.manual_seed(seed)
    save_checkpoint(build_model("resnet18"), directory, architecture="resnet18", test_accuracy=test_accuracy)
    return directory


def job_settings(state_dir: Path, data_dir: Path, weights: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        weights=weights, device="cpu", training_device="cpu", state_dir=state_dir, data_dir=data_dir,
        data_skip_integrity_check=True, admin_token=TOKEN, registry_poll_s=0, max_batch_size=4,
        max_batch_files=4, torch_threads=1,
    )
    return Settings(**(values | overrides))


def wait_until(probe: Callable[[], Any], timeout_s: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_ready(client: TestClient) -> str:
    """The served model's version, once the service is ready."""
    return wait_until(lambda: client.get("/readyz").status_code == 200 and client.get("/readyz").json()
                      ["model_version"], 60, "the service to be ready")


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/train/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(client: TestClient, job_id: str, *statuses: str, timeout_s: float = 120) -> dict[str, Any]:
    return wait_until(lambda: (j := job(client, job_id))["status"] in statuses and j, timeout_s,
                      f"job {job_id} to become {' or '.join(statuses)}")
