import pytest
import torch
from torch import nn

from model.architectures import build_model
from model.fastcnn import LOGIT_SCALE, WHITENING_WIDTH, ConvStage, FastCNN


def _correlated_images(count: int = 200) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated, as natural images are."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(count, 1, 33, 33, generator=generator)
    smooth = (base[:, :, 1:, 1:] + base[:, :, :-1, :-1]) / 2
    return smooth.repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1) \
        + 0.1 * torch.randn(count, 3, 32, 32, generator=generator)


def test_whitening_stem_decorrelates_the_patches_it_was_set_from():
    model = FastCNN().eval()
    images = _correlated_images()
    model.initialize_from_data(images)
    with torch.inference_mode():
        responses = torch.nn.functional.conv2d(images, model.whiten.weight)  # without the (zero) bias
    first_half = responses[:, :WHITENING_WIDTH // 2].permute(1, 0, 2, 3).reshape(WHITENING_WIDTH // 2, -1)
    covariance = first_half @ first_half.T / first_half.shape[1]
    # Unit variance in every direction except the near-empty ones that the epsilon damps; no correlation.
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 0.02
    assert covariance.diagonal().max() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(model.whiten.weight[WHITENING_WIDTH // 2:], -model.whiten.weight[:WHITENING_WIDTH // 2])


def test_only_the_whitening_filters_and_the_norm_scales_are_frozen():
    model = build_model("fastcnn")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    norms = [f"{name}.{norm}" for name, m in model.named_modules() if isinstance(m, ConvStage)
             for norm in ("bn1", "bn2")]
    assert frozen == {"whiten.weight", *(f"{name}.weight" for name in norms)}
    assert len(norms) == 6


def test_every_convolution_starts_with_the_identity_on_its_first_channels():
    model = build_model("fastcnn")
    conv = model.layer2.conv2
    centre_only = torch.zeros(3, 3)
    centre_only[1, 1] = 1
    assert torch.equal(conv.weight[0, 0], centre_only)
    assert torch.count_nonzero(conv.weight[0, 1:]) == 0


@pytest.mark.parametrize("batch_size", [1, 5])
def test_logits_per_image_and_their_scale(batch_size):
    model = build_model("fastcnn").eval()
    images = torch.randn(batch_size, 3, 32, 32)
    with torch.inference_mode():
        logits = model(images)
        unscaled = model.fc(torch.flatten(model.pool(model.layer3(model.layer2(model.layer1(
            model.activation(model.whiten(images)))))), 1))
    assert logits.shape == (batch_size, 10)
    torch.testing.assert_close(logits, unscaled * LOGIT_SCALE)


def test_whitening_filters_travel_in_the_state_dict():
    trained = FastCNN()
    trained.initialize_from_data(_correlated_images(20))
    fresh = FastCNN()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.whiten.weight, trained.whiten.weight)
    assert isinstance(fresh.fc, nn.Linear) and fresh.fc.bias is None
