"""The shared job store: PostgreSQL at ``APP_DATABASE_URL``, and a session advisory lock electing the runner.

Every replica reads and writes the same ``jobs`` table through a small connection pool (psycopg 3, the
optional ``[postgres]`` extra). The guarantees are the SQLite store's, enforced by the server: a partial unique
index admits one queued or running job, and status changes are compare-and-set ``UPDATE``s. The runner is the
session holding ``pg_try_advisory_lock(RUNNER_LOCK_KEY)`` on its own connection: the server drops the lock
when that session ends, whether its process exited, was killed or lost its network (server-side TCP
keepalives, set on the session, bound how long a vanished host keeps it). docs/jobs.md says why an advisory
lock rather than ``FOR UPDATE SKIP LOCKED`` or a queue library.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from app.control.jobs.schemas import ACTIVE_STATUSES, Job, JobProgress, JobResult, JobStatus, TrainParams
from app.control.jobs.store import JobConflict, RecordedProcess, job_from_row


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key from a name, so it cannot collide with small integer keys."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


RUNNER_LOCK_KEY = _lock_key("cifar-serve: the job runner")
_SCHEMA_LOCK_KEY = _lock_key("cifar-serve: the jobs schema")
CONNECT_TIMEOUT_S = 10
# How fast the server notices that the runner's host vanished (a dead node, a cut network) and frees the
# lock for another runner: idle + interval * count seconds, about 25 s. A process that exits or is killed
# closes its socket, which frees the lock at once.
_KEEPALIVES = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5", "SET tcp_keepalives_count = 3")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled',
                                                  'interrupted')),
    params       JSONB NOT NULL,
    progress     JSONB NOT NULL DEFAULT '{}',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    error        TEXT,
    result       JSONB,
    pid          INTEGER,
    pid_started  BIGINT,
    host         TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job ON jobs ((true)) WHERE status IN ('queued', 'running');
"""


class JobDatabaseUnreachable(RuntimeError):
    """The PostgreSQL server at APP_DATABASE_URL did not answer at start-up."""


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresJobStore:
    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self.url = url
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, name="jobs",
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S},
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout as error:
            self._pool.close()
            raise JobDatabaseUnreachable(
                f"could not connect to the job database at APP_DATABASE_URL={redacted(url)} within "
                f"{CONNECT_TIMEOUT_S} s; check that the server runs and the URL, user and password are right, "
                "or unset APP_DATABASE_URL for the embedded SQLite store") from error
        with self._pool.connection() as db, db.transaction():
            # Replicas starting together would race on CREATE ... IF NOT EXISTS; the first one creates.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            db.execute(_SCHEMA)

    @property
    def where(self) -> str:
        return f"PostgreSQL at {redacted(self.url)}"

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._pool.connection() as db:
            return db.execute(query, params).fetchone()

    def _changed(self, query: str, params: tuple[Any, ...]) -> bool:
        with self._pool.connection() as db:
            return db.execute(query, params).rowcount == 1

    def create(self, params: TrainParams) -> Job:
        try:
            row = self._one("INSERT INTO jobs (id, status, params) VALUES (%s, %s, %s::jsonb) RETURNING *",
                            (secrets.token_hex(6), JobStatus.QUEUED, params.model_dump_json()))
        except psycopg.errors.UniqueViolation:
            active = self.active()
            raise JobConflict(active.id if active else None) from None
        assert row is not None
        return job_from_row(row)

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return job_from_row(row) if row else None

    def newest_first(self, limit: int | None = None) -> list[Job]:
        with self._pool.connection() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT %s", (limit,)).fetchall()
        return [job_from_row(row) for row in rows]

    def active(self) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE status IN ('queued', 'running')")
        return job_from_row(row) if row else None

    def process(self, job_id: str) -> RecordedProcess | None:
        row = self._one("SELECT pid, pid_started, host FROM jobs WHERE id = %s", (job_id,))
        return RecordedProcess(row["pid"], row["pid_started"], row["host"]) if row and row["pid"] is not None \
            else None

    def claim(self, job_id: str, host: str) -> bool:
        return self._changed(
            "UPDATE jobs SET status = %s, host = %s, pid = NULL, pid_started = NULL, "
            "started_at = COALESCE(started_at, now()) WHERE id = %s AND status = %s",
            (JobStatus.RUNNING, host, job_id, JobStatus.QUEUED))

    def record_process(self, job_id: str, pid: int, pid_started: int | None) -> None:
        self._changed("UPDATE jobs SET pid = %s, pid_started = %s WHERE id = %s", (pid, pid_started, job_id))

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        self._changed("UPDATE jobs SET progress = %s::jsonb WHERE id = %s", (progress.model_dump_json(), job_id))

    def finish(self, job_id: str, status: JobStatus, *, error: str | None = None, result: JobResult | None = None,
               only_from: tuple[JobStatus, ...] = ACTIVE_STATUSES) -> bool:
        return self._changed(
            "UPDATE jobs SET status = %s, error = %s, result = %s::jsonb, finished_at = now() "
            "WHERE id = %s AND status = ANY(%s)",
            (status, error, result.model_dump_json() if result else None, job_id, [str(s) for s in only_from]))

    def requeue(self, job_id: str, only_from: tuple[JobStatus, ...]) -> bool:
        try:
            return self._changed(
                "UPDATE jobs SET status = %s, error = NULL, result = NULL, finished_at = NULL, pid = NULL, "
                "pid_started = NULL, host = NULL WHERE id = %s AND status = ANY(%s)",
                (JobStatus.QUEUED, job_id, [str(s) for s in only_from]))
        except psycopg.errors.UniqueViolation:
            active = self.active()
            raise JobConflict(active.id if active else None) from None

    def runner_lock(self) -> AdvisoryRunnerLock:
        return AdvisoryRunnerLock(self.url)

    def close(self) -> None:
        self._pool.close()


class AdvisoryRunnerLock:
    """A session-level advisory lock on a connection of its own, held for as long as this process runs jobs.
    A standby keeps its session open between tries, so trying costs one query, not a connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: psycopg.Connection[Any] | None = None
        self._locked = False

    @property
    def holder(self) -> str:
        return f"the PostgreSQL advisory lock {RUNNER_LOCK_KEY}"

    def acquire(self) -> bool:
        if self._locked:
            return self.held()
        try:
            if self._session is None:
                self._session = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                for setting in _KEEPALIVES:
                    self._session.execute(setting)
            row = self._session.execute("SELECT pg_try_advisory_lock(%s)", (RUNNER_LOCK_KEY,)).fetchone()
        except psycopg.Error:
            self.release()
            return False  # the database is unreachable: nobody can be elected through it now; retried later
        self._locked = bool(row and row[0])
        return self._locked

    def held(self) -> bool:
        if not self._locked or self._session is None:
            return False
        try:
            self._session.execute("SELECT 1")
        except psycopg.Error:  # the session is gone, and the server has dropped (or will drop) its lock
            self.release()
            return False
        return True

    def release(self) -> None:
        session, self._session, self._locked = self._session, None, False
        if session is not None:
            session.close()  # ending the session releases its advisory locks
