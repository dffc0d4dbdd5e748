"""Fixtures for the service's tests: settings, the app in-process (with its lifespan) and as a real uvicorn
process. Checkpoints are random-init resnet18s made by ``tests.conftest.make_checkpoint``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.factory import create_app
from tests.conftest import REPO_ROOT, make_checkpoint

ADMIN_TOKEN = "test-admin-token-0123456789"
READY_TIMEOUT_S = 120.0  # importing torch and warming up on a busy 2-core machine


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random-init resnet18, with other weights, so another version."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint-other"), seed=1)


def service_settings(weights: Path, **overrides: object) -> Settings:
    """Small, fast settings for CPU tests; ``overrides`` win."""
    values: dict[str, object] = dict(
        weights=weights, device="cpu", max_batch_size=8, max_batch_delay_ms=5, max_queue=64, max_batch_files=16,
        admin_token=ADMIN_TOKEN, torch_threads=1, parallel_batches=1, decode_threads=2,
    )
    return Settings(**(values | overrides))


@asynccontextmanager
async def running_app(settings: Settings, wait_ready: bool = True) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            if wait_ready:
                await _until_ready(client)
            yield app, client


async def _until_ready(client: httpx.AsyncClient) -> None:
    import anyio

    deadline = time.monotonic() + READY_TIMEOUT_S
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready"
        await anyio.sleep(0.05)


@dataclass
class Service:
    app: FastAPI
    client: httpx.AsyncClient


UPLOAD_LIMIT = 2_000_000  # bytes: low, so the "too large" cases stay cheap to send


@pytest.fixture(scope="module")
async def service(tiny_checkpoint: Path) -> AsyncIterator[Service]:
    """The app serving ``tiny_checkpoint``, shared by one test module."""
    async with running_app(service_settings(tiny_checkpoint, max_upload_bytes=UPLOAD_LIMIT)) as (app, client):
        yield Service(app, client)


@pytest.fixture
def client(service: Service) -> httpx.AsyncClient:
    return service.client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    ``environment`` only."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")} | environment
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, *command, "--port", str(port)], cwd=REPO_ROOT, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                status = httpx.get(f"{server.url}/readyz" if wait_ready else f"{server.url}/healthz").status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            assert time.monotonic() < deadline, f"the server did not become ready:\n{log.read_text()}"
            time.sleep(0.1)
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
    values = {
        "APP_WEIGHTS": str(weights), "APP_DEVICE": "cpu", "APP_MAX_BATCH_SIZE": "8", "APP_MAX_BATCH_DELAY_MS": "5",
        "APP_ADMIN_TOKEN": ADMIN_TOKEN, "APP_TORCH_THREADS": "1", "APP_PARALLEL_BATCHES": "1",
    }
    return values | overrides
