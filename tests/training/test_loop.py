import pytest
import torch
import torch.nn.functional as F

from tests.training.conftest import tiny_run_args
from training import loop
from training.__main__ import main
from training.loop import build_learner, smoothed_cross_entropy, speed_estimate


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_equals_torch_cross_entropy(smoothing):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert smoothed_cross_entropy(logits, labels, smoothing) == pytest.approx(expected.item(), rel=1e-6)


def test_speed_estimate_names_the_rate_the_epoch_and_the_rest_of_the_run():
    line = speed_estimate(seconds_per_step=2.0, steps_per_epoch=900, batch_size=64, epochs_left=3)
    assert line.startswith("measured 32 images/s") and "30 min per epoch" in line
    assert "90 min for the 3 epoch(s) left" in line


def test_a_network_with_a_data_dependent_start_is_initialised_from_the_training_images():
    from training.config import TrainingConfig
    from training.distributed import Worker

    config = TrainingConfig(data_dir="", arch="fastcnn", epochs=1, warmup_epochs=0, batch_size=8)
    worker = Worker(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    untouched = build_learner(config, worker, steps_per_epoch=5).model.whiten.weight
    initialised = build_learner(config, worker, steps_per_epoch=5, train_images=images).model.whiten.weight
    other = build_learner(config, worker, steps_per_epoch=5, train_images=images.flip(2)).model.whiten.weight
    assert not torch.equal(untouched, initialised) and not torch.equal(initialised, other)


def test_without_a_terminal_training_prints_progress_lines_within_an_epoch(synthetic_cifar10, tmp_path, capsys,
                                                                           monkeypatch):
    from tests.training.conftest import tiny_run_args
    from training.__main__ import main

    monkeypatch.setattr("training.loop.PROGRESS_LINE_EVERY_S", 0.0)  # a line after every step
    assert main(tiny_run_args(synthetic_cifar10, tmp_path / "run", "--epochs", "1", "--no-plots")) == 0
    out = capsys.readouterr().out  # captured: not a terminal, so tqdm's bar is off
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/1: step ")]
    assert [line.split(" (")[0] for line in lines] == [f"epoch 1/1: step {n}/4" for n in range(1, 5)]
    assert all(", loss " in line and line.endswith(" images/s") for line in lines)


def test_progress_line():
    from training.loop import progress_line

    assert progress_line(1, 35, 120, 390, 1.23456, 411.7) == ("epoch 1/35: step 120/390 (31 %), loss 1.235, "
                                                              "412 images/s")


def test_a_run_whose_loss_diverges_stops_with_a_clear_error_and_no_checkpoint(synthetic_cifar10, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # A learning rate far past any that trains: the loss is NaN within the first epoch.
    status = main(tiny_run_args(synthetic_cifar10, run_dir, "--lr", "100", "--norm-lr-scale", "1e30", "--no-plots"))
    assert status == 1
    error = capsys.readouterr().err
    assert "error: training diverged: the epoch's mean loss is nan at epoch 1" in error and "lower --lr" in error
    assert not (run_dir / "checkpoint").exists()


def test_the_loss_is_checked_within_an_epoch_too(synthetic_cifar10, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "DIVERGENCE_CHECK_EVERY", 1)
    status = main(tiny_run_args(synthetic_cifar10, tmp_path / "run", "--lr", "100", "--norm-lr-scale", "1e30",
                                "--no-plots"))
    assert status == 1
    assert "error: training diverged: the loss became nan at epoch 1, step " in capsys.readouterr().err
