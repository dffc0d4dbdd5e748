"""``python -m app`` for a benchmark, started so that nothing waits on a service that failed to start.

    with service(checkpoint, {"APP_DEVICE": "cuda"}, ready_timeout_s=120) as (url, pid):
        ...

The service is started the way an operator starts it (``python -m app --port P --workers N`` with ``APP_*``
settings), and is ready when ``GET /readyz`` answers 200. The wait ends early, with the end of the service's log,
when the process exits, or when ``/readyz`` says the checkpoint could not be loaded (the service then stays up
without a model, and a plain wait would last until its timeout); else after ``ready_timeout_s``. On the GPU
machine every second counts: 15 minutes in all (benchmarks/gpu/run.sh).

The service runs in a process group of its own (so that stopping it stops every uvicorn worker). A caller killed
by a timeout's SIGTERM still stops it, since SIGTERM then unwinds the caller like Ctrl-C; and where
``BENCHMARK_PID_DIR`` is set, the group's id is written there while the service runs, so that a script whose step
was killed outright (SIGKILL) can stop what that step left, by id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
# What /readyz says (app/factory.py) when APP_WEIGHTS could not be loaded: the service lives on without a model.
LOAD_FAILED = "could not be"


class ServiceFailed(RuntimeError):
    """The service exited, could not load its model, or was not ready in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(text[-lines:])


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServiceFailed(f"the service exited with {process.returncode}; the end of {log}:\n{log_tail(log)}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            if LOAD_FAILED in response.text:
                raise ServiceFailed(f"the service could not load its model: {response.text}; the end of {log}:\n"
                                    f"{log_tail(log)}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServiceFailed(f"the service was not ready in {timeout_s:.0f} s; the end of {log}:\n{log_tail(log)}")
        time.sleep(0.2)


@contextmanager
def service(checkpoint: Path | None, environment: dict[str, str], workers: int = 1, ready_timeout_s: float = 120,
            log_dir: Path | None = None) -> Iterator[tuple[str, int]]:
    """The service on a free loopback port serving ``checkpoint`` (None: its own default): (url, pid)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    # HTTP only: the device has no grpcio (benchmarks/gpu/wheels.py NOT_ON_DEVICE), and services started one
    # after another would race for the gRPC port.
    env |= {"APP_GRPC_PORT": "0"} | ({"APP_WEIGHTS": str(checkpoint)} if checkpoint is not None else {}) | environment
    folder = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"service-{port}.log"
    with open(log, "wb") as output:
        # Its own process group, so that stopping it stops every uvicorn worker too.
        process = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--workers", str(workers)],
                                   cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    pid_dir = os.environ.get("BENCHMARK_PID_DIR")
    pidfile = Path(pid_dir) / f"{port}.pid" if pid_dir else None
    if pidfile is not None:
        pidfile.write_text(f"{process.pid}\n")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _unwind)
    try:
        wait_until_ready(url, process, log, ready_timeout_s)
        yield url, process.pid
    finally:
        stop(process)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _unwind(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
