import pytest
import torch
import torch.nn.functional as F

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
