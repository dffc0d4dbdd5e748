"""``POST /admin/promote/{version}``: an operator promotes a registered version by hand; the registry's pointer
moves, the replica serves it, and a restart keeps it."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.factory import create_app
from tests.support.checkpoints import make_checkpoint
from tests.support.service import ADMIN
from tests.support.training_api import FINISHED, TINY_JOB, job_settings, wait_for_status, wait_ready


def test_never_only_registers_and_an_operator_promotes_by_hand(tmp_path: Path, synthetic_cifar10: Path) -> None:
    serving = make_checkpoint(tmp_path / "serving", test_accuracy=0.0)
    settings = job_settings(tmp_path / "state", synthetic_cifar10, serving, promote="never")
    with TestClient(create_app(settings)) as client:
        before = wait_ready(client)
        job_id = client.post("/train", json=TINY_JOB | {"epochs": 1}, headers=ADMIN).json()["id"]
        done = wait_for_status(client, job_id, *FINISHED)
        assert done["status"] == "succeeded" and done["result"]["promoted"] is False, done
        version = done["result"]["model_version"]
        assert client.get("/model").json()["version"] == before
        assert client.get("/models").json()["current"] is None

        promoted = client.post(f"/admin/promote/{version}", headers=ADMIN)
        assert promoted.status_code == 200 and promoted.json() == {"version": version, "previous_version": before}
        assert client.get("/model").json()["version"] == version
        assert client.get("/models").json()["current"] == version
        assert client.post("/admin/promote/resnet18-000000000000", headers=ADMIN).status_code == 404
    # After a restart the registry's current version is served, not APP_WEIGHTS.
    with TestClient(create_app(settings)) as client:
        assert wait_ready(client) == version
