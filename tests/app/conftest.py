"""Fixtures for the service's tests: checkpoints and the app in-process (with its lifespan), shared by one
test module. The helpers behind them are in ``tests/support/service.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.support.checkpoints import make_checkpoint
from tests.support.service import UPLOAD_LIMIT, running_app, service_settings


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random-init resnet18, with other weights, so another version."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint-other"), seed=1)


@dataclass
class Service:
    app: FastAPI
    client: httpx.AsyncClient


@pytest.fixture(scope="module")
async def service(tiny_checkpoint: Path, other_checkpoint: Path) -> AsyncIterator[Service]:
    """The app serving ``tiny_checkpoint``, shared by one test module; ``/admin/reload`` may load
    ``other_checkpoint``."""
    settings = service_settings(tiny_checkpoint, max_upload_bytes=UPLOAD_LIMIT, reload_roots=[other_checkpoint])
    async with running_app(settings) as (app, client):
        yield Service(app, client)


@pytest.fixture
def client(service: Service) -> httpx.AsyncClient:
    return service.client
