"""The embedded job store: SQLite in ``APP_STATE_DIR/jobs.db``, and a file lock beside it electing the runner.

Each call opens its own short-lived connection, so the store is safe to use from any thread (async code calls
it from worker threads: a locked database must not hold an event loop for the busy timeout), and from several
processes sharing the state directory on one host (SQLite's locks need one kernel: not a network file system).
The runner is whichever process holds ``flock`` on ``APP_STATE_DIR/runner.lock``; the kernel drops the lock
when that process dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.control.jobs.schemas import ACTIVE_STATUSES, Job, JobProgress, JobResult, JobStatus, TrainParams
from app.control.jobs.store import (
    JobConflict,
    JobStoreUnavailable,
    RecordedProcess,
    active_or_settled,
    job_from_row,
    serialised,
    utc_now,
)

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
    pid_started  INTEGER,
    host         TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job
    ON jobs ((status IN ('queued', 'running'))) WHERE status IN ('queued', 'running');
"""
_ACTIVE_SQL = "('queued', 'running')"
# How long a call waits for another connection's write lock before it fails (SQLite's busy timeout). Writes
# here take milliseconds; a lock held for seconds means a stuck process, and the caller (a worker thread of the
# runner or a route) should get an error it can report rather than wait on.
BUSY_TIMEOUT_S = 5.0


class SQLiteJobStore:
    def __init__(self, path: Path, lock_path: Path | None = None) -> None:
        self.path = path
        self.lock_path = lock_path if lock_path is not None else path.with_name("runner.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL lets readers (GET /train on any replica) proceed while the runner writes progress.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "host" not in columns:  # a jobs.db from before runners recorded their host
                db.execute("ALTER TABLE jobs ADD COLUMN host TEXT")

    @property
    def where(self) -> str:
        return f"SQLite at {self.path}"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise JobStoreUnavailable(f"the job database {self.path} stayed locked by another process for "
                                          f"{BUSY_TIMEOUT_S:g} s; try again") from error
            raise
        finally:
            db.close()

    def create(self, params: TrainParams) -> Job:
        job_id, stored = secrets.token_hex(6), serialised(params)
        for _ in range(2):  # once more if the job in the way was an unreadable record, now marked failed
            try:
                with self._connect() as db:
                    db.execute("INSERT INTO jobs (id, status, params, created_at) VALUES (?, ?, ?, ?)",
                               (job_id, JobStatus.QUEUED, stored, utc_now().isoformat()))
                break
            except sqlite3.IntegrityError:
                active = self.active()
                if active is not None:
                    raise JobConflict(active.id) from None
        else:
            raise JobConflict(None)
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def newest_first(self, limit: int | None = None) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit or -1,)).fetchall()
        return [job_from_row(row) for row in rows]

    def active(self) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE status IN {_ACTIVE_SQL}").fetchone()
        return active_or_settled(self, job_from_row(row) if row else None)

    def process(self, job_id: str) -> RecordedProcess | None:
        with self._connect() as db:
            row = db.execute("SELECT pid, pid_started, host FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return RecordedProcess(row["pid"], row["pid_started"], row["host"]) if row and row["pid"] is not None \
            else None

    def claim(self, job_id: str, host: str) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, host = ?, pid = NULL, pid_started = NULL, "
                "started_at = COALESCE(started_at, ?) WHERE id = ? AND status = ?",
                (JobStatus.RUNNING, host, utc_now().isoformat(), job_id, JobStatus.QUEUED),
            )
        return cursor.rowcount == 1

    def record_process(self, job_id: str, pid: int, pid_started: int | None) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET pid = ?, pid_started = ? WHERE id = ?", (pid, pid_started, job_id))

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress.model_dump_json(), job_id))

    def finish(self, job_id: str, status: JobStatus, *, error: str | None = None, result: JobResult | None = None,
               only_from: tuple[JobStatus, ...] = ACTIVE_STATUSES) -> bool:
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
        marks = ", ".join("?" for _ in only_from)
        try:
            with self._connect() as db:
                cursor = db.execute(
                    f"UPDATE jobs SET status = ?, error = NULL, result = NULL, finished_at = NULL, pid = NULL, "
                    f"pid_started = NULL, host = NULL WHERE id = ? AND status IN ({marks})",
                    (JobStatus.QUEUED, job_id, *only_from),
                )
        except sqlite3.IntegrityError:
            active = self.active()
            raise JobConflict(active.id if active else None) from None
        return cursor.rowcount == 1

    def runner_lock(self) -> FileRunnerLock:
        return FileRunnerLock(self.lock_path)

    def close(self) -> None:
        pass  # no connection outlives a call


class FileRunnerLock:
    """An exclusive ``flock`` on a file: one holder among all processes on the host, uvicorn workers included
    (each opens the file itself, and flock locks belong to the open file, not to the process tree). The file
    descriptor is not inherited by training processes (Python opens files non-inheritable), so an orphaned
    training process never keeps the lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def holder(self) -> str:
        return f"the lock on {self.path}"

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # The holder's PID, for a person looking at the state directory; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None
