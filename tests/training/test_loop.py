import pytest
import torch
import torch.nn.functional as F

from training.loop import smoothed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_equals_torch_cross_entropy(smoothing):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert smoothed_cross_entropy(logits, labels, smoothing) == pytest.approx(expected.item(), rel=1e-6)
