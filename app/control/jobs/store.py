"""Training-job records, kept where every replica sees them: the ``JobStore`` interface and how to open one.

Two stores implement it (docs/jobs.md says when to use which):

- ``SQLiteJobStore`` (sqlite_store.py), the embedded default: ``APP_STATE_DIR/jobs.db``, no server to run,
  shared only by processes on one host.
- ``PostgresJobStore`` (postgres_store.py): ``APP_DATABASE_URL=postgresql://…``, shared by replicas anywhere.

Both keep the same guarantees in the database itself, so they hold whoever asks: at most one job is queued
or running (a partial unique index), every status change is a compare-and-set (``claim``, ``finish`` and
``requeue`` only move a job from the statuses they name, so a late writer cannot overwrite an outcome), and
the store hands out the ``RunnerLock`` that elects the one process that runs jobs.

Both are synchronous, and every call is bounded: SQLite waits at most its ``BUSY_TIMEOUT_S`` for a lock, PostgreSQL
calls have a pool wait, a statement timeout and a client-side deadline (postgres_store.py). A call that runs out
of time raises ``JobStoreUnavailable``. Async code calls them in worker threads (the runner's ``_call``), so a
slow database never holds an event loop. Every record reads back: parameters are checked to survive being
stored before they are, and a record that still cannot be read is shown as a failed job (``job_from_row``).
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pydantic import ValidationError

from app.control.jobs.parameters import stored_params
from app.control.jobs.schemas import ACTIVE_STATUSES, Job, JobProgress, JobResult, JobStatus, TrainParams

logger = logging.getLogger(__name__)

SQLITE_FILE = "jobs.db"
RUNNER_LOCK_FILE = "runner.lock"


class UnknownJob(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no training job {job_id!r}; GET /train lists the jobs")
        self.job_id = job_id


class JobConflict(Exception):
    """Another job is queued or running; ``active_id`` names it."""

    def __init__(self, active_id: str | None) -> None:
        super().__init__(f"job {active_id} is already queued or running; wait for it or cancel it "
                         f"with DELETE /train/{active_id}")
        self.active_id = active_id


class RecordedProcess(NamedTuple):
    """A job's training process as its runner recorded it: the PID means something only on ``host``, and
    only together with the start time (clock ticks since boot), since PIDs are reused."""

    pid: int
    started: int | None
    host: str | None


class RunnerLock(Protocol):
    """The election of the one process that runs jobs: whoever holds the lock. Non-blocking; the lock is
    also released when its holder dies, however it dies."""

    def acquire(self) -> bool:
        """Take the lock if it is free; whether this process holds it now."""

    def held(self) -> bool:
        """Whether this process still holds it (a database lock goes with its connection)."""

    def release(self) -> None: ...

    @property
    def holder(self) -> str:
        """What the lock is, in words, for logs and /healthz."""


class JobStore(Protocol):
    def create(self, params: TrainParams) -> Job:
        """Record a new queued job, or raise ``JobConflict`` if one is already queued or running."""

    def get(self, job_id: str) -> Job | None: ...

    def newest_first(self, limit: int | None = None) -> list[Job]: ...

    def active(self) -> Job | None:
        """The one queued or running job, if any."""

    def process(self, job_id: str) -> RecordedProcess | None: ...

    def claim(self, job_id: str, host: str) -> bool:
        """Move a queued job to running for a runner on ``host``; False if it is no longer queued (another
        runner took it, or it was cancelled). Only the winner starts a process."""

    def record_process(self, job_id: str, pid: int, pid_started: int | None) -> None: ...

    def update_progress(self, job_id: str, progress: JobProgress) -> None: ...

    def finish(self, job_id: str, status: JobStatus, *, error: str | None = None, result: JobResult | None = None,
               only_from: tuple[JobStatus, ...] = ACTIVE_STATUSES) -> bool:
        """Move a job to a final status, but only from one of ``only_from``: whoever finishes a job first
        (its monitor, a cancel, a restarted runner) wins, and a late writer cannot overwrite the outcome."""

    def requeue(self, job_id: str, only_from: tuple[JobStatus, ...]) -> bool:
        """Queue a stopped job again (resume); raises ``JobConflict`` if another job is active."""

    def runner_lock(self) -> RunnerLock: ...

    def close(self) -> None: ...

    @property
    def where(self) -> str:
        """Where the records are, in words (a database URL without its password)."""


def open_job_store(database_url: str | None, state_dir: Path) -> JobStore:
    """The store ``APP_DATABASE_URL`` names: unset, SQLite in ``state_dir``; ``postgresql://…``, PostgreSQL."""
    if database_url is None:
        from app.control.jobs.sqlite_store import SQLiteJobStore

        return SQLiteJobStore(state_dir / SQLITE_FILE, lock_path=state_dir / RUNNER_LOCK_FILE)
    try:
        from app.control.jobs.postgres_store import PostgresJobStore  # psycopg is the optional [postgres] extra
    except ModuleNotFoundError as missing:
        raise MissingDriver("APP_DATABASE_URL names a PostgreSQL database, but its driver is not installed "
                            f"({missing}): pip install -e '.[postgres]', or unset APP_DATABASE_URL for the "
                            "embedded SQLite store") from missing
    return PostgresJobStore(database_url)


class JobStoreUnavailable(RuntimeError):
    """The job database did not answer in time (or at all); nothing was changed that the caller can rely on.
    A route answers it with 503: retrying later is the remedy."""


def active_or_settled(store: JobStore, job: Job | None) -> Job | None:
    """The active job as ``active()`` returns it. A queued or running record that cannot be read
    (``job_from_row``) would hold the one active slot for ever, refusing every ``POST /train`` with a 409
    that no cancel could clear: it is marked failed in the database, with its reason, and None returned."""
    if job is None or not is_unreadable(job):
        return job
    if store.finish(job.id, JobStatus.FAILED, error=job.error, only_from=ACTIVE_STATUSES):
        logger.error("job %s: %s; marked failed", job.id, job.error)
    return None


class MissingDriver(RuntimeError):
    """APP_DATABASE_URL names PostgreSQL, and psycopg (the [postgres] extra) is not installed."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def this_host() -> str:
    return socket.gethostname()


def serialised(params: TrainParams) -> str:
    """``params`` as the store keeps them (JSON), checked to read back as the same parameters before they are
    stored: a record that could not be read back would be a job no route can show."""
    text = params.model_dump_json()
    try:
        again = TrainParams.model_validate_json(text)
    except ValueError as error:
        raise UnstorableParams(f"these training parameters do not survive being stored: {reason(error)}") from None
    if again != params:
        raise UnstorableParams("these training parameters read back differently after being stored; "
                               "use plain finite numbers")
    return text


class UnstorableParams(ValueError):
    """Parameters that would not read back from the store as they are (a value JSON cannot hold)."""


def job_from_row(row: Any) -> Job:
    """A job from a database row (a mapping); JSON columns come as text (SQLite) or decoded (PostgreSQL).

    Never raises for what a row holds: a record this version cannot read (corrupt JSON, an option whose rules
    changed, a value JSON cannot hold) is shown as a failed job whose error says why, so one bad row can
    neither hide the others from ``GET /train`` nor stop ``recover()`` and with it the service's start-up.
    Options that were renamed or removed since the job was stored are read by today's names, or left out.
    """
    try:
        return _readable_job(row)
    except (ValueError, TypeError, KeyError) as error:  # pydantic's ValidationError and JSON's errors are ValueErrors
        return _unreadable_job(row, reason(error))


def is_unreadable(job: Job) -> bool:
    """Whether ``job`` stands for a record that could not be read (``job_from_row``)."""
    return job.params is None


def _readable_job(row: Any) -> Job:
    def decoded(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    stored = decoded(row["params"])
    if not isinstance(stored, dict):
        raise ValueError(f"its parameters are {type(stored).__name__}, not an object")
    params, dropped = stored_params(stored)
    if dropped:
        logger.debug("job %s was stored with options this version no longer has, left out: %s", row["id"], dropped)
    return Job(
        id=row["id"],
        status=JobStatus(row["status"]),
        params=params,
        progress=JobProgress.model_validate(decoded(row["progress"]) or {}),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        result=JobResult.model_validate(decoded(row["result"])) if row["result"] else None,
    )


def _unreadable_job(row: Any, why: str) -> Job:
    def when(value: Any) -> datetime | None:
        try:
            return value if isinstance(value, datetime) or value is None else datetime.fromisoformat(str(value))
        except ValueError:
            return None

    return Job(
        id=str(row["id"]),
        status=JobStatus.FAILED,
        params=None,
        created_at=when(row["created_at"]) or datetime.fromtimestamp(0, UTC),
        started_at=when(row["started_at"]),
        finished_at=when(row["finished_at"]),
        error=f"this job's stored record cannot be read by this version ({why}); it was recorded as "
              f"{str(row['status'])!r}. Its files, if any, are still in its run directory",
    )


def reason(error: BaseException) -> str:
    """What is wrong, in one line, without the offending values (a record may hold anything)."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(part) for part in detail['loc']) or 'the record'}: {detail['msg']}"
                         for detail in error.errors(include_input=False, include_url=False))
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
    return f"{type(error).__name__}: {error}"
