"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary folder, ``postgres`` listening only on
a unix socket there (no TCP port to collide on), trust authentication, fsync off. One per test session; each
test gets a database of its own (``postgres_url``).

The server refuses to run as root, so under root (CI runs ``bash .ci/run`` as root) it runs as the
``postgres`` user that Debian's package creates, else as ``nobody``, through ``runuser``. The binaries are
found on PATH or in Debian's ``/usr/lib/postgresql/<version>/bin``; ``.ci/run`` installs the package where
neither has them.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port

SUPERUSER = "cifar_serve_tests"
START_TIMEOUT_S = 120


def postgres_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _unprivileged_user() -> str | None:
    """The user the server runs as when the tests run as root; None when they do not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("the tests run as root, and PostgreSQL refuses root: create a 'postgres' user")


@dataclass
class PostgresServer:
    socket_dir: Path
    port: int
    _bin: Path
    _data: Path
    _user: str | None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def _run(self, *argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        command = [str(self._bin / argv[0]), *argv[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        # From the server's own folder: the repository may sit where the unprivileged user cannot enter.
        return subprocess.run(command, check=True, capture_output=True, text=True, cwd=self.socket_dir,
                              **kwargs)  # type: ignore[call-overload]

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self._data), "-l", str(self.socket_dir / "server.log"), "-o", options,
                  "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "stop")

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def processes(self) -> list[int]:
        """The postmaster's PID and its children's (the backends and background workers)."""
        postmaster = int((self._data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP every process of the server: its sockets stay open and the kernel still acknowledges
        packets, but nothing answers, as with a server stuck on a dead disk or swapped out."""
        for pid in self.processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if (self._data / "postmaster.pid").is_file():
            for pid in self.processes():
                os.kill(pid, signal.SIGCONT)

    def log(self) -> str:
        path = self.socket_dir / "server.log"
        return path.read_text() if path.is_file() else ""


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A new server of its own, stopped and deleted afterwards (the tests' fixtures, and benchmarks/faults.py,
    which stops and freezes it)."""
    binaries = postgres_binaries()
    if binaries is None:
        raise PostgresMissing("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                    "apt-get install postgresql, as .ci/run does")
    user = _unprivileged_user()
    # Not under pytest's tmp_path: that is private to the user running the tests (mode 0700), and the server
    # may run as another.
    root = Path(tempfile.mkdtemp(prefix="cifar-serve-pg-"))
    if user is not None:
        shutil.chown(root, user=user)
    server = PostgresServer(socket_dir=root, port=free_port(), _bin=binaries, _data=root / "data", _user=user)
    try:
        server._run("initdb", "-D", str(server._data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")
        server.start()
    except subprocess.CalledProcessError as error:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {error.stderr}\n{server.log()}") from error
    try:
        yield server
    finally:
        try:
            server.thaw()
            server.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped (a test or benchmark stopped it on purpose)
        finally:
            shutil.rmtree(root, ignore_errors=True)


class PostgresMissing(RuntimeError):
    """No PostgreSQL binaries on this machine."""


@contextmanager
def _server_for_tests() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg", reason="psycopg is the [postgres] extra: pip install -e '.[test]'")
    try:
        with running_server() as server:
            yield server
    except PostgresMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with _server_for_tests() as server:
        yield server


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server for one test alone: for tests that stop or freeze it, which would disturb the others."""
    with _server_for_tests() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh database on the session's server."""
    return postgres_server.create_database()
