"""The service for tests: small CPU settings, the app in-process with its lifespan, and ``python -m app`` (or
any server command) as a live process on a free port. Checkpoints come from ``tests.support.checkpoints``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from app.config import Settings
from app.factory import create_app
from tests.support import REPO_ROOT
from tests.support.net import free_port, wait_for_http
from tests.support.waiting import eventually

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READY_TIMEOUT_S = 600.0  # importing torch and warming up has taken minutes on the shared 2-core machine
UPLOAD_LIMIT = 2_000_000  # bytes, for the in-process service fixture: low, so "too large" stays cheap to send


def service_settings(weights: Path, **overrides: object) -> Settings:
    """Small, fast settings for CPU tests, with a fresh state directory (a reload moves the registry's
    pointer, which would otherwise decide what the next test's service starts with); ``overrides`` win."""
    values: dict[str, object] = dict(
        weights=weights, device="cpu", max_batch_size=8, max_batch_delay_ms=5, max_queue=64, max_batch_files=16,
        admin_token=ADMIN_TOKEN, torch_threads=1, parallel_batches=1, decode_threads=2,
        state_dir=Path(tempfile.mkdtemp(prefix="service-state-")), grpc_port=0,
        # A data-plane test needs no control plane (tests/support/training_api.py's settings start one).
        run_jobs=False,
    )
    return Settings(**(values | overrides))  # type: ignore[arg-type]


@asynccontextmanager
async def running_app(settings: Settings, wait_ready: bool = True) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            if wait_ready:
                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await eventually(ready, READY_TIMEOUT_S, "the service to be ready", every_s=0.05)
            yield app, client


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextmanager
def live_server(tmp_path: Path, environment: dict[str, str], wait_ready: bool = True,
                command: tuple[str, ...] = ("-m", "app")) -> Iterator[LiveServer]:
    """``python -m app`` (or ``python <command>``) in a subprocess on a free port, with ``APP_*`` from
    ``environment`` only; stopped with SIGTERM (then killed) on exit."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    # No gRPC server unless a test asks for one on a port of its own, and a control plane of its own on a
    # free port: servers run side by side here, and the default ports may be another test's.
    env |= {"APP_STATE_DIR": str(tmp_path / "state"), "APP_GRPC_PORT": "0",
            "APP_CONTROL_PORT": str(free_port())} | environment
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, *command, "--port", str(port)], cwd=REPO_ROOT, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for_http(f"{server.url}/readyz" if wait_ready else f"{server.url}/healthz", process, log,
                      READY_TIMEOUT_S)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def live_environment(weights: Path, **overrides: str) -> dict[str, str]:
    """The ``APP_*`` variables of a small CPU live server serving ``weights``; ``overrides`` win."""
    values = {
        "APP_WEIGHTS": str(weights), "APP_DEVICE": "cpu", "APP_MAX_BATCH_SIZE": "8", "APP_MAX_BATCH_DELAY_MS": "5",
        "APP_ADMIN_TOKEN": ADMIN_TOKEN, "APP_TORCH_THREADS": "1", "APP_PARALLEL_BATCHES": "1",
    }
    return values | overrides
