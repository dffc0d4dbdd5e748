from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import CARD_FILE, save_checkpoint
from model.architectures import build_model
from tests.support.cifar10 import write_cifar10

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def make_checkpoint(directory: Path, seed: int = 0, architecture: str = "resnet18") -> Path:
    """A random-init checkpoint: tests need real weights files, not trained ones."""
    torch.manual_seed(seed)
    model = build_model(architecture)
    save_checkpoint(model, directory, architecture=architecture, test_accuracy=0.1 + seed / 100)
    return directory


def with_input_size(checkpoint: Path, directory: Path, input_size: int) -> Path:
    """A copy of ``checkpoint`` whose card says it takes ``input_size`` pixels (the CIFAR networks pool
    adaptively, so they run at any size)."""
    shutil.copytree(checkpoint, directory)
    card = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps(card | {"input_size": input_size}))
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))
