from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from training.__main__ import main

# ResNet-18 on 64 of the synthetic images, batch 16: 4 steps per epoch, under 2 s an epoch on 2 CPU cores.
# float32, since the tests compare numbers exactly (a resumed run against an uninterrupted one).
TINY_RUN = ["--arch", "resnet18", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "0.5",
            "--skip-integrity-check", "--device", "cpu", "--checkpoint-every", "1", "--train-limit", "64",
            "--test-limit", "20", "--precision", "fp32"]


def tiny_run_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY_RUN, *extra]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m training ARGS` in a fresh process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(synthetic_cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-epoch run, shared by the tests that inspect what a run leaves behind."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(tiny_run_args(synthetic_cifar10, run_dir)) == 0
    return run_dir
