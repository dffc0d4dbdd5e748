"""Training-job records in SQLite, so they survive a restart of the API.

SQLite is the embedded default: one file under ``APP_STATE_DIR``, no server to run. Each call opens its own
short-lived connection, so the store is safe to use from the event loop and from worker threads alike, and
from several processes sharing the state directory. "At most one job queued or running" is a partial unique
index, so the database itself refuses a second active job even when two requests race.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from app.control.jobs.schemas import ACTIVE_STATUSES, Job, JobProgress, JobResult, JobStatus, TrainParams

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    params       TEXT NOT NULL,
    progress     TEXT NOT NULL DEFAULT '{}',
    created_at   TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    error        TEXT,
    result       TEXT,
    pid          INTEGER,
    pid_started  INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job
    ON jobs ((status IN ('queued', 'running'))) WHERE status IN ('queued', 'running');
"""
_ACTIVE_SQL = "('queued', 'running')"


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


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL lets readers (GET /train on any replica) proceed while the runner writes progress.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def create(self, params: TrainParams) -> Job:
        """Record a new queued job, or raise ``JobConflict`` if one is already queued or running."""
        job_id = secrets.token_hex(6)
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO jobs (id, status, params, created_at) VALUES (?, ?, ?, ?)",
                    (job_id, JobStatus.QUEUED, params.model_dump_json(), utc_now().isoformat()),
                )
        except sqlite3.IntegrityError:
            active = self.active()
            raise JobConflict(active.id if active else None) from None
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def newest_first(self, limit: int | None = None) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit or -1,)).fetchall()
        return [_job(row) for row in rows]

    def active(self) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE status IN {_ACTIVE_SQL}").fetchone()
        return _job(row) if row else None

    def process(self, job_id: str) -> tuple[int, int | None] | None:
        """The recorded training process: its PID and start time (clock ticks since boot), if any."""
        with self._connect() as db:
            row = db.execute("SELECT pid, pid_started FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row["pid"], row["pid_started"]) if row and row["pid"] is not None else None

    def mark_running(self, job_id: str, pid: int, pid_started: int | None) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, pid = ?, pid_started = ?, started_at = COALESCE(started_at, ?) "
                "WHERE id = ? AND status = ?",
                (JobStatus.RUNNING, pid, pid_started, utc_now().isoformat(), job_id, JobStatus.QUEUED),
            )
        return cursor.rowcount == 1

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress.model_dump_json(), job_id))

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result: JobResult | None = None,
        only_from: tuple[JobStatus, ...] = ACTIVE_STATUSES,
    ) -> bool:
        """Move a job to a final status, but only from one of ``only_from``: whoever finishes a job first
        (its monitor, a cancel, a restarted API) wins, and a late writer cannot overwrite the outcome."""
        marks = ", ".join("?" for _ in only_from)
        with self._connect() as db:
            cursor = db.execute(
                f"UPDATE jobs SET status = ?, error = ?, result = ?, finished_at = ? "
                f"WHERE id = ? AND status IN ({marks})",
                (status, error, result.model_dump_json() if result else None, utc_now().isoformat(),
                 job_id, *only_from),
            )
        return cursor.rowcount == 1

    def requeue(self, job_id: str, only_from: tuple[JobStatus, ...]) -> bool:
        """Queue a stopped job again (resume); raises ``JobConflict`` if another job is active."""
        marks = ", ".join("?" for _ in only_from)
        try:
            with self._connect() as db:
                cursor = db.execute(
                    f"UPDATE jobs SET status = ?, error = NULL, result = NULL, finished_at = NULL, pid = NULL, "
                    f"pid_started = NULL WHERE id = ? AND status IN ({marks})",
                    (JobStatus.QUEUED, job_id, *only_from),
                )
        except sqlite3.IntegrityError:
            active = self.active()
            raise JobConflict(active.id if active else None) from None
        return cursor.rowcount == 1


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=JobStatus(row["status"]),
        params=TrainParams.model_validate_json(row["params"]),
        progress=JobProgress.model_validate(json.loads(row["progress"])),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        result=JobResult.model_validate_json(row["result"]) if row["result"] else None,
    )
