"""The CUDA path: bf16 autocast, data and augmentation on the GPU. Skipped where no GPU is visible; run on the
GPU machine with `python -m pytest tests/training -m gpu` (benchmarks/gpu/run.sh does)."""

import math

import pytest
import torch

from model.checkpoint import load_checkpoint
from tests.training.conftest import tiny_run_args
from training.__main__ import main
from training.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda_run(data_dir, run_dir, *extra):
    args = [arg if arg != "cpu" else "cuda" for arg in tiny_run_args(data_dir, run_dir, "--no-plots", *extra)]
    assert main(args) == 0
    return read_metrics(run_dir / "metrics.jsonl")


def test_training_on_cuda_lowers_the_loss_and_names_the_gpu(synthetic_cifar10, tmp_path):
    records = _cuda_run(synthetic_cifar10, tmp_path / "run", "--ema", "--cutout", "8")
    epochs = [r for r in records if r["event"] == "epoch"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    card = load_checkpoint(tmp_path / "run" / "checkpoint").card
    assert card.device == torch.cuda.get_device_name()


def test_deterministic_cuda_runs_give_identical_weights(synthetic_cifar10, tmp_path):
    _cuda_run(synthetic_cifar10, tmp_path / "a", "--deterministic")
    _cuda_run(synthetic_cifar10, tmp_path / "b", "--deterministic")
    first, second = (load_checkpoint(tmp_path / name / "checkpoint").card for name in ("a", "b"))
    assert first.weights_sha256 == second.weights_sha256


def test_bf16_autocast_training_on_cuda_as_the_gpu_run_trains(synthetic_cifar10, tmp_path):
    """benchmarks/gpu/run.sh trains with --precision auto (bf16 autocast on CUDA) and saves float16 weights; the
    tiny runs above are float32, so this is the only test of the path the real run takes."""
    records = _cuda_run(synthetic_cifar10, tmp_path / "run", "--precision", "auto", "--weights-dtype", "float16")
    start = next(r for r in records if r["event"] == "start")
    assert start["precision"] == "bf16"
    epochs = [r for r in records if r["event"] == "epoch"]
    assert all(math.isfinite(r["train_loss"]) for r in epochs)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint", "cuda")
    assert checkpoint.card.precision == "bf16" and checkpoint.card.weights_dtype == "float16"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = checkpoint.model(torch.randn(4, 3, 32, 32, device="cuda"))
    assert logits.shape == (4, 10) and torch.isfinite(logits.float()).all()
