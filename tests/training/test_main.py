"""The command line as users meet it: a fresh process, its exit code, and what it prints."""

import signal
import subprocess
import sys
import time

import torch

from tests.support import REPO_ROOT
from tests.training.conftest import run_cli, tiny_run_args


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--data-dir", "--run-dir", "--arch", "--epochs", "--batch-size", "--lr", "--momentum",
                   "--weight-decay", "--label-smoothing", "--warmup-epochs", "--ema", "--no-ema", "--tta",
                   "--no-tta", "--cutout", "--compile", "--device", "--seed", "--deterministic",
                   "--checkpoint-every", "--resume", "--eval-only", "--weights", "--download",
                   "--skip-integrity-check", "--holdout", "--train-limit", "--test-limit", "--no-plots",
                   "--weights-dtype"):
        assert option in result.stdout, option


def test_missing_data_dir_exits_2_with_one_line(tmp_path):
    result = run_cli("--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--download" in _one_error_line(result)


def test_negative_epochs_exit_2_with_one_line(tmp_path):
    result = run_cli("--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--epochs", "-3")
    assert result.returncode == 2
    assert "--epochs" in _one_error_line(result)


def test_unknown_architecture_exits_2_with_one_line(tmp_path):
    result = run_cli("--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--arch", "vgg16")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "vgg16" in line and "resnet50" in line


def test_rebuilt_data_without_the_flag_exits_1_naming_the_flag(synthetic_cifar10, tmp_path):
    result = run_cli("--data-dir", str(synthetic_cifar10), "--run-dir", str(tmp_path / "run"), "--arch", "resnet18")
    assert result.returncode == 1
    assert "--skip-integrity-check" in _one_error_line(result)


def test_sigterm_stops_a_run_promptly_and_leaves_a_resumable_state(synthetic_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run_args(synthetic_cifar10, run_dir, "--epochs", "50", "--train-limit", "32")
    process = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        metrics = run_dir / "metrics.jsonl"
        # Two epoch lines: the state of epoch 1, saved right after its line, is then surely on disk.
        while not (metrics.exists() and metrics.read_text().count('"event": "epoch"') >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - stopped_at < 15
    assert "--resume" in stderr.strip().splitlines()[-1]
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert 1 <= state["epoch"] < 50 and state["learner"]["model"]
    assert '"event": "interrupted"' in (run_dir / "metrics.jsonl").read_text()
