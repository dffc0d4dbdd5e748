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
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from app.control.jobs.schemas import ACTIVE_STATUSES, Job, JobProgress, JobResult, JobStatus, TrainParams
from app.control.jobs.store import (
    JobConflict,
    JobStoreUnavailable,
    RecordedProcess,
    active_or_settled,
    job_from_row,
    serialised,
)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key from a name, so it cannot collide with small integer keys."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


RUNNER_LOCK_KEY = _lock_key("cifar-serve: the job runner")
_SCHEMA_LOCK_KEY = _lock_key("cifar-serve: the jobs schema")
CONNECT_TIMEOUT_S = 10
# Every call is bounded on the client's side, so a database that stalls (overloaded, frozen, a network that
# drops packets) makes calls fail with JobStoreUnavailable instead of holding a thread, and through it the
# runner or a route, for ever (issue 22). The bounds, each for what it catches:
# - POOL_WAIT_S: waiting for a free pooled connection (psycopg_pool's own default is 30 s);
# - STATEMENT_TIMEOUT_S: the server cancels a statement that runs (or waits on a lock) longer;
# - CALL_TIMEOUT_S: the client's own deadline on each call, for a server that cannot even cancel (frozen,
#   unreachable): the connection's socket is shut down and the call fails. Kernel-level TCP keepalives and
#   tcp_user_timeout below notice a vanished host, but not a live kernel under a stopped server process, which
#   still acknowledges every packet; only this deadline does.
POOL_WAIT_S = 5.0
STATEMENT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0
# libpq's client-side TCP settings (ignored on unix sockets): probe an idle connection after 10 s, every 5 s,
# give up after 3 misses; fail a send the server has not acknowledged within 20 s.
_CLIENT_TCP: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "tcp_user_timeout": 20_000}
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
    """The URL without its password, for logs and errors: ``user:password@`` and libpq's ``?password=``."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        hidden = [(name, "***" if name == "password" else value) for name, value in query]
        parts = parts._replace(query=urlencode(hidden, safe="/:*"))
    return urlunsplit(parts)


@contextmanager
def client_deadline(connection: psycopg.Connection[Any], seconds: float, where: str) -> Iterator[None]:
    """Fail the calls made on ``connection`` inside the block if they take longer than ``seconds``: a timer
    shuts the connection's socket down, so psycopg's wait for the server's answer ends with an error, the
    connection is discarded, and ``JobStoreUnavailable`` is raised. ``shutdown`` acts on the socket without
    closing the descriptor psycopg owns, and the lock makes sure it only happens while the block runs."""
    lock = threading.Lock()
    state = {"running": True, "cut": False}

    def cut() -> None:
        with lock:
            if not state["running"]:
                return
            state["cut"] = True
            try:
                with socket.socket(fileno=os.dup(connection.pgconn.socket)) as duplicate:
                    duplicate.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the call fails by itself

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.Error as error:
        if state["cut"]:
            raise JobStoreUnavailable(f"the job database at {where} did not answer within {seconds:g} s; "
                                      "the call was abandoned, try again later") from error
        raise
    finally:
        with lock:
            state["running"] = False
        timer.cancel()


class PostgresJobStore:
    def __init__(self, url: str, *, max_connections: int = 4, call_timeout_s: float = CALL_TIMEOUT_S,
                 pool_wait_s: float = POOL_WAIT_S, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.call_timeout_s = call_timeout_s
        self.pool_wait_s = pool_wait_s
        self._statement_timeout_ms = int(statement_timeout_s * 1000)
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, name="jobs", timeout=pool_wait_s,
            configure=self._configure,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S,
                    **_CLIENT_TCP},
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout as error:
            self._pool.close()
            raise JobDatabaseUnreachable(
                f"could not connect to the job database at APP_DATABASE_URL={redacted(url)} within "
                f"{CONNECT_TIMEOUT_S} s; check that the server runs and the URL, user and password are right, "
                "or unset APP_DATABASE_URL for the embedded SQLite store") from error
        with self._connection() as db, db.transaction():
            # Replicas starting together would race on CREATE ... IF NOT EXISTS; the first one creates.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            db.execute(_SCHEMA)

    def _configure(self, db: psycopg.Connection[Any]) -> None:
        with client_deadline(db, self.call_timeout_s, redacted(self.url)):
            db.execute(f"SET statement_timeout = {self._statement_timeout_ms}")

    @property
    def where(self) -> str:
        return f"PostgreSQL at {redacted(self.url)}"

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection for one call, under the call's deadline; every way the database fails to answer
        becomes ``JobStoreUnavailable``."""
        try:
            with self._pool.connection() as db, client_deadline(db, self.call_timeout_s, redacted(self.url)):
                yield db
        except PoolTimeout as error:
            raise JobStoreUnavailable(f"no connection to the job database at {redacted(self.url)} within "
                                      f"{self.pool_wait_s:g} s; try again later") from error
        except psycopg.errors.QueryCanceled as error:
            raise JobStoreUnavailable(f"the job database at {redacted(self.url)} took longer than its "
                                      f"statement timeout ({self._statement_timeout_ms} ms); try again later") \
                from error
        except psycopg.OperationalError as error:
            raise JobStoreUnavailable(f"the job database at {redacted(self.url)} failed: {error}") from error

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._connection() as db:
            return db.execute(query, params).fetchone()

    def _changed(self, query: str, params: tuple[Any, ...]) -> bool:
        with self._connection() as db:
            return db.execute(query, params).rowcount == 1

    def create(self, params: TrainParams) -> Job:
        job_id, stored = secrets.token_hex(6), serialised(params)
        for _ in range(2):  # once more if the job in the way was an unreadable record, now marked failed
            try:
                row = self._one("INSERT INTO jobs (id, status, params) VALUES (%s, %s, %s::jsonb) RETURNING *",
                                (job_id, JobStatus.QUEUED, stored))
            except psycopg.errors.UniqueViolation:
                active = self.active()
                if active is not None:
                    raise JobConflict(active.id) from None
                continue
            assert row is not None
            return job_from_row(row)
        raise JobConflict(None)

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return job_from_row(row) if row else None

    def newest_first(self, limit: int | None = None) -> list[Job]:
        with self._connection() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT %s", (limit,)).fetchall()
        return [job_from_row(row) for row in rows]

    def active(self) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE status IN ('queued', 'running')")
        return active_or_settled(self, job_from_row(row) if row else None)

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
        return AdvisoryRunnerLock(self.url, self.call_timeout_s)

    def close(self) -> None:
        self._pool.close()


class AdvisoryRunnerLock:
    """A session-level advisory lock on a connection of its own, held for as long as this process runs jobs.
    A standby keeps its session open between tries, so trying costs one query, not a connection."""

    def __init__(self, url: str, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.url = url
        self.call_timeout_s = call_timeout_s
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
                self._session = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                                **_CLIENT_TCP)
                with client_deadline(self._session, self.call_timeout_s, redacted(self.url)):
                    for setting in _KEEPALIVES:
                        self._session.execute(setting)
            with client_deadline(self._session, self.call_timeout_s, redacted(self.url)):
                row = self._session.execute("SELECT pg_try_advisory_lock(%s)", (RUNNER_LOCK_KEY,)).fetchone()
        except (psycopg.Error, JobStoreUnavailable):
            self.release()
            return False  # the database is unreachable: nobody can be elected through it now; retried later
        self._locked = bool(row and row[0])
        return self._locked

    def held(self) -> bool:
        if not self._locked or self._session is None:
            return False
        try:
            with client_deadline(self._session, self.call_timeout_s, redacted(self.url)):
                self._session.execute("SELECT 1")
        except (psycopg.Error, JobStoreUnavailable):
            # The session is gone (or hung), and the server has dropped (or will drop) its lock.
            self.release()
            return False
        return True

    def release(self) -> None:
        session, self._session, self._locked = self._session, None, False
        if session is not None:
            session.close()  # ending the session releases its advisory locks
