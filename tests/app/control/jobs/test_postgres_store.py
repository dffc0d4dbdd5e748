"""What only the PostgreSQL store has: client-side deadlines on a server that stops answering, and URLs
that never show their password."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from app.control.jobs.schemas import JobStatus, TrainParams
from app.control.jobs.store import JobStoreUnavailable
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait_until

pytest.importorskip("psycopg", reason="psycopg is the [postgres] extra: pip install -e '.[test]'")

from app.control.jobs.postgres_store import PostgresJobStore, redacted  # noqa: E402


def outcome(call: Callable[[], Any]) -> BaseException | Any:
    """What ``call`` returned or raised, from another thread. The join's bound is only there to end the test if
    the call hangs for good (it did, before the deadlines): the assertion is that it came back at all."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as error:  # noqa: BLE001 - the error is what the test looks at
            result.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the store call hung on the frozen database"
    return result[0]


def test_a_frozen_server_makes_store_calls_fail_instead_of_hanging(own_postgres_server: PostgresServer) -> None:
    url = own_postgres_server.create_database()
    store = PostgresJobStore(url, call_timeout_s=1.0, pool_wait_s=1.0)
    lock = store.runner_lock()
    try:
        job = store.create(TrainParams())
        assert lock.acquire()
        own_postgres_server.freeze()
        try:
            # The first call finds a pooled connection and waits on it; the next ones find none free.
            for call in (lambda: store.get(job.id), store.newest_first, store.active,
                         lambda: store.finish(job.id, JobStatus.CANCELLED)):
                error = outcome(call)
                assert isinstance(error, JobStoreUnavailable), error
                assert "job database" in str(error)
            # The runner's lock session cannot be confirmed either: the runner steps down, not hangs.
            assert outcome(lock.held) is False
        finally:
            own_postgres_server.thaw()
        # Once the server answers again, so does the store: its pool replaced the abandoned connection.
        back = wait_until(lambda: _readable(store, job.id), what="the store to answer after the thaw")
        assert back.status == JobStatus.QUEUED  # the abandoned finish changed nothing
    finally:
        lock.release()
        store.close()


def _readable(store: PostgresJobStore, job_id: str) -> Any:
    try:
        return store.get(job_id)
    except JobStoreUnavailable:
        return None


def test_a_statement_that_runs_too_long_is_cancelled_by_the_server(postgres_url: str) -> None:
    import psycopg

    store = PostgresJobStore(postgres_url, statement_timeout_s=0.5, call_timeout_s=30)
    job = store.create(TrainParams())
    try:
        # Another session holds the row: without a statement timeout the update would wait for it for ever.
        with psycopg.connect(postgres_url) as other, other.transaction():
            other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
            error = outcome(lambda: store.finish(job.id, JobStatus.CANCELLED))
        assert isinstance(error, JobStoreUnavailable) and "statement timeout" in str(error)
        assert store.get(job.id).status == JobStatus.QUEUED
    finally:
        store.close()


@pytest.mark.parametrize("url", [
    "postgresql://cifar:s3cret@db:5432/jobs",
    "postgresql://cifar@db/jobs?password=s3cret&sslmode=require",
    "postgresql:///jobs?host=/run/pg&password=s3cret",
])
def test_redacted_urls_never_show_the_password(url: str) -> None:
    shown = redacted(url)
    assert "s3cret" not in shown and "***" in shown
    assert shown.split("?")[0].endswith("/jobs")


def test_redacting_keeps_a_url_without_a_password() -> None:
    url = "postgresql://cifar@db/jobs?host=/run/pg&sslmode=require"
    assert redacted(url) == url
