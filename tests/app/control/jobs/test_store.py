from pathlib import Path

import pytest

from app.control.jobs.schemas import JobProgress, JobResult, JobStatus, TrainParams
from app.control.jobs.store import JobConflict, JobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_a_job_round_trips_and_survives_reopening(store: JobStore) -> None:
    job = store.create(TrainParams(epochs=3))
    store.mark_running(job.id, pid=1234, pid_started=99)
    store.update_progress(job.id, JobProgress(epoch=1, epochs=3, train_loss=1.5))
    reopened = JobStore(store.path).get(job.id)
    assert reopened is not None
    assert reopened.status == JobStatus.RUNNING and reopened.params.epochs == 3
    assert reopened.progress.train_loss == 1.5 and reopened.started_at is not None
    assert store.process(job.id) == (1234, 99)


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
    store.mark_running(job.id, pid=1, pid_started=None)
    store.finish(job.id, JobStatus.INTERRUPTED, error="api stopped")
    other = store.create(TrainParams())
    with pytest.raises(JobConflict):
        store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))
    store.finish(other.id, JobStatus.FAILED, error="x")
    assert store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))
    again = store.get(job.id)
    assert again.status == JobStatus.QUEUED and again.error is None and again.finished_at is None
    assert store.process(job.id) is None
    assert not store.requeue(job.id, only_from=(JobStatus.INTERRUPTED,))


def test_unknown_job_is_none(store: JobStore) -> None:
    assert store.get("nope") is None and store.process("nope") is None
