"""The job store's contract, run against both stores: SQLite in a temporary folder, and PostgreSQL on the
test session's own server (tests/support/postgres.py)."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.control.jobs import parameters
from app.control.jobs.schemas import JobProgress, JobResult, JobStatus, TrainParams
from app.control.jobs.sqlite_store import SQLiteJobStore
from app.control.jobs.store import (
    JobConflict,
    JobStore,
    MissingDriver,
    RecordedProcess,
    UnstorableParams,
    open_job_store,
)
from tests.app.control.jobs.records import poison

Opener = Callable[[], JobStore]


@pytest.fixture
def open_store(database_url: str | None, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on one database, as many times as a test likes (each open is another replica)."""
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        opened.append(open_job_store(database_url, tmp_path / "state"))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> JobStore:
    return open_store()


def test_a_job_round_trips_and_survives_reopening(open_store: Opener) -> None:
    store = open_store()
    job = store.create(TrainParams(epochs=3))
    assert store.claim(job.id, host="node-a")
    store.record_process(job.id, pid=1234, pid_started=99)
    store.update_progress(job.id, JobProgress(epoch=1, epochs=3, train_loss=1.5))
    reopened = open_store().get(job.id)
    assert reopened is not None
    assert reopened.status == JobStatus.RUNNING and reopened.params.epochs == 3
    assert reopened.progress.train_loss == 1.5 and reopened.started_at is not None
    assert reopened.started_at >= reopened.created_at
    assert store.process(job.id) == RecordedProcess(1234, 99, "node-a")


def test_a_job_is_claimed_once(store: JobStore) -> None:
    job = store.create(TrainParams())
    assert store.claim(job.id, host="a")
    assert not store.claim(job.id, host="b")
    assert store.get(job.id).status == JobStatus.RUNNING and store.process(job.id) is None


def test_every_replica_sees_the_same_jobs(open_store: Opener) -> None:
    one, other = open_store(), open_store()
    job = one.create(TrainParams(epochs=7))
    assert [seen.id for seen in other.newest_first()] == [job.id] and other.active() == one.active()
    with pytest.raises(JobConflict) as conflict:
        other.create(TrainParams())
    assert conflict.value.active_id == job.id
    assert other.finish(job.id, JobStatus.CANCELLED)
    assert one.get(job.id).status == JobStatus.CANCELLED


def test_only_one_job_is_active_at_a_time(store: JobStore) -> None:
    first = store.create(TrainParams())
    with pytest.raises(JobConflict) as conflict:
        store.create(TrainParams())
    assert conflict.value.active_id == first.id
    assert store.finish(first.id, JobStatus.SUCCEEDED, result=JobResult(model_version="v", test_accuracy=0.5,
                                                                          promoted=True))
    second = store.create(TrainParams())
    assert [job.id for job in store.newest_first()] == [second.id, first.id]
    assert store.get(first.id).result.model_version == "v"


def test_finish_only_moves_from_the_expected_statuses(store: JobStore) -> None:
    job = store.create(TrainParams())
    assert store.finish(job.id, JobStatus.CANCELLED)
    # A late writer (the process's own exit after a cancel) must not overwrite the outcome.
    assert not store.finish(job.id, JobStatus.FAILED, error="exit -15")
    assert store.get(job.id).status == JobStatus.CANCELLED and store.get(job.id).finished_at is not None


def test_requeue_clears_the_outcome_and_respects_the_active_limit(store: JobStore) -> None:
    job = store.create(TrainParams())
    assert store.claim(job.id, host="a")
    store.record_process(job.id, pid=1, pid_started=None)
    store.finish(job.id, JobStatus.INTERRUPTED, error="api stopped")
    other = store.create(TrainParams())
    with pytest.raises(JobConflict):
        store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))
    store.finish(other.id, JobStatus.FAILED, error="x")
    assert store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))
    again = store.get(job.id)
    assert again.status == JobStatus.QUEUED and again.error is None and again.finished_at is None
    assert store.process(job.id) is None and again.started_at is not None  # resumed jobs keep their start
    assert not store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))


def test_unknown_job_is_none(store: JobStore) -> None:
    assert store.get("nope") is None and store.process("nope") is None


def test_newest_first_honours_the_limit(store: JobStore) -> None:
    ids = []
    for _ in range(3):
        ids.append(store.create(TrainParams()).id)
        store.finish(ids[-1], JobStatus.FAILED, error="x")
    assert [job.id for job in store.newest_first(2)] == ids[::-1][:2]
    assert len(store.newest_first()) == 3


def test_an_older_sqlite_database_gains_the_host_column(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT "
                   "NOT NULL, params TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL, "
                   "started_at TEXT, finished_at TEXT, error TEXT, result TEXT, pid INTEGER, pid_started INTEGER)")
        db.execute("INSERT INTO jobs (id, status, params, created_at, pid) VALUES ('old', 'failed', '{}', "
                   "'2026-01-01T00:00:00+00:00', 7)")
    store = SQLiteJobStore(path)
    assert store.get("old").status == JobStatus.FAILED and store.process("old") == RecordedProcess(7, None, None)


def test_a_postgresql_url_without_its_driver_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "app.control.jobs.postgres_store", None)  # as if psycopg were absent
    with pytest.raises(MissingDriver, match=r"pip install -e '\.\[postgres\]'"):
        open_job_store("postgresql://db/jobs", tmp_path)


def test_an_unreachable_postgresql_server_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("psycopg")
    from app.control.jobs import postgres_store

    monkeypatch.setattr(postgres_store, "CONNECT_TIMEOUT_S", 1)
    url = f"postgresql://app:s3cret-password@/jobs?host={tmp_path}&port=1"  # no server has this socket
    with pytest.raises(postgres_store.JobDatabaseUnreachable) as unreachable:
        open_job_store(url, tmp_path)
    assert "APP_DATABASE_URL=postgresql://app:***@" in str(unreachable.value)
    assert "s3cret" not in str(unreachable.value)


# What an unreadable record can hold, and what its error must name. JSONB refuses text that is not JSON, so
# that one is SQLite's only.
UNREADABLE = {
    "a non-finite number stored as null": ('{"norm_lr_scale": null}', "norm_lr_scale"),
    "a value today's bounds refuse": ('{"epochs": -5}', "epochs"),
    "not an object": ("[1, 2]", "list"),
    "not JSON": ("{not json", "not valid JSON"),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_record_is_shown_failed_and_hides_no_other(
        store: JobStore, database_url: str | None, tmp_path: Path, kind: str) -> None:
    stored, named = UNREADABLE[kind]
    if database_url is not None and kind == "not JSON":
        pytest.skip("PostgreSQL's JSONB column holds only JSON")
    good = store.create(TrainParams(epochs=3))
    store.finish(good.id, JobStatus.SUCCEEDED, result=JobResult(model_version="v", test_accuracy=0.5, promoted=True))
    bad = store.create(TrainParams())
    store.finish(bad.id, JobStatus.SUCCEEDED, result=JobResult(model_version="w", test_accuracy=0.5, promoted=True))
    poison(database_url, tmp_path / "state", bad.id, stored)

    listed = {job.id: job for job in store.newest_first()}
    assert set(listed) == {good.id, bad.id}
    assert listed[good.id].status == JobStatus.SUCCEEDED and listed[good.id].params.epochs == 3
    shown = store.get(bad.id)
    assert shown == listed[bad.id]
    assert shown.status == JobStatus.FAILED and shown.params is None
    assert named in shown.error and "recorded as 'succeeded'" in shown.error


def test_an_unreadable_active_record_is_settled_so_new_jobs_can_start(
        store: JobStore, database_url: str | None, tmp_path: Path) -> None:
    stuck = store.create(TrainParams())
    poison(database_url, tmp_path / "state", stuck.id, '{"norm_lr_scale": null}')
    # Before the fix it held the one active slot: every POST /train was a 409 that no cancel could clear.
    assert store.active() is None
    assert store.get(stuck.id).status == JobStatus.FAILED
    fresh = store.create(TrainParams(epochs=2))
    assert store.active().id == fresh.id


def test_a_conflict_with_an_unreadable_active_record_settles_it_and_creates(
        store: JobStore, database_url: str | None, tmp_path: Path) -> None:
    stuck = store.create(TrainParams())
    poison(database_url, tmp_path / "state", stuck.id, '{"epochs": -5}')
    fresh = store.create(TrainParams(epochs=2))  # the insert collides, settles the bad record, then goes in
    assert fresh.status == JobStatus.QUEUED and store.active().id == fresh.id
    assert "epochs" in store.get(stuck.id).error


def test_old_records_with_removed_or_renamed_options_still_load(
        store: JobStore, database_url: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parameters, "RENAMED_OPTIONS", {"n_epochs": "epochs"})
    job = store.create(TrainParams())
    store.finish(job.id, JobStatus.FAILED, error="x")
    poison(database_url, tmp_path / "state", job.id, '{"n_epochs": 4, "a_knob_since_removed": true, "seed": 7}')
    loaded = store.get(job.id)
    assert loaded.status == JobStatus.FAILED and loaded.error == "x"
    assert loaded.params.epochs == 4 and loaded.params.seed == 7


def test_non_finite_parameters_are_refused_before_they_are_stored(store: JobStore) -> None:
    with pytest.raises(ValidationError, match="finite"):
        TrainParams.model_validate_json('{"norm_lr_scale": 1e999}')
    with pytest.raises(ValidationError, match="finite"):
        TrainParams(lr=float("nan"))
    # And whatever slips past validation (model_construct skips it) fails the round trip, not a later read.
    with pytest.raises(UnstorableParams):
        store.create(TrainParams.model_construct(**(TrainParams().model_dump() | {"norm_lr_scale": float("inf")})))
    assert store.newest_first() == []
