"""Session fixtures every part of the tests uses: data sets and a checkpoint. Helpers are in tests/support."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.checkpoints import make_checkpoint
from tests.support.cifar10 import write_cifar10

# The throwaway PostgreSQL server (postgres_server, postgres_url) of the job-store tests.
pytest_plugins = ["tests.support.postgres"]

SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "cifar10" / "compact"
REAL_DATA_CACHE = REPO_ROOT / ".cache" / "cifar10"


@pytest.fixture(scope="session")
def synthetic_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding a tiny synthetic ``cifar-10-batches-py`` (100 train, 50 test images)."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    """The real CIFAR-10 from ../shared/cifar10, unpacked once into the git-ignored .cache/."""
    if not SHARED_CIFAR10.is_dir():
        pytest.skip("../shared/cifar10 is not on this machine")
    if not (REAL_DATA_CACHE / "cifar-10-batches-py" / "test_batch").is_file():
        subprocess.run(
            [sys.executable, str(SHARED_CIFAR10 / "unpack.py"), "--out", str(REAL_DATA_CACHE)], check=True
        )
    return REAL_DATA_CACHE


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))
