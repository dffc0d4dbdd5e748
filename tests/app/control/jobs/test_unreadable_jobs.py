"""One unreadable job record, as POST /train {"norm_lr_scale": 1e999} once stored, through the whole service:
start-up (the runner's recover()) and every /train route still work, and such a body is refused up front."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fastapi.testclient import TestClient

from app.control.jobs.schemas import JobStatus, TrainParams
from app.control.jobs.sqlite_store import SQLiteJobStore
from app.control.jobs.store import this_host
from app.factory import create_app
from tests.support.checkpoints import make_checkpoint
from tests.support.service import ADMIN
from tests.support.training_api import job_settings, wait_ready


def test_an_unreadable_record_breaks_neither_start_up_nor_the_train_routes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = SQLiteJobStore(state / "jobs.db")
    finished = store.create(TrainParams())
    store.finish(finished.id, JobStatus.SUCCEEDED)
    running = store.create(TrainParams())
    store.claim(running.id, this_host())
    with sqlite3.connect(state / "jobs.db") as db:
        db.execute("UPDATE jobs SET params = '{\"norm_lr_scale\": null}'")  # both records
    settings = job_settings(state, tmp_path / "no-data", make_checkpoint(tmp_path / "serving"))
    with TestClient(create_app(settings)) as client:  # before the fix: recover() raised, the service exited
        wait_ready(client)
        listed = client.get("/train", headers=ADMIN)
        assert listed.status_code == 200, listed.text
        shown = {job["id"]: job for job in listed.json()}
        assert set(shown) == {finished.id, running.id}
        for job_id in shown:
            one = client.get(f"/train/{job_id}", headers=ADMIN)
            assert one.status_code == 200, one.text
            assert one.json()["status"] == "failed" and "norm_lr_scale" in one.json()["error"]
            assert one.json()["params"] is None
        assert client.delete(f"/train/{running.id}", headers=ADMIN).status_code == 409  # finished: nothing to stop
        refused = client.post("/train", headers=ADMIN | {"content-type": "application/json"},
                              content=b'{"norm_lr_scale": 1e999}')
        assert refused.status_code == 422 and "finite" in refused.text
        # The poisoned running record no longer holds the one active slot.
        accepted = client.post("/train", headers=ADMIN, json={"epochs": 2})
        assert accepted.status_code == 202, accepted.text
