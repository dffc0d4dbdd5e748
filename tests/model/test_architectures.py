import pytest
import torch

from model.architectures import ARCHITECTURES, build_model
from model.checkpoint import load_checkpoint, save_checkpoint

SMALL = [name for name in ARCHITECTURES if name in ("resnet20", "resnet56", "fastcnn", "resnet18")]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_gives_ten_logits_per_image(architecture):
    model = build_model(architecture).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("architecture", SMALL)
def test_a_checkpoint_of_each_family_loads_back_to_the_same_outputs(architecture, tmp_path):
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    images = torch.randn(4, 3, 32, 32)
    card = save_checkpoint(model, tmp_path, architecture=architecture)
    loaded = load_checkpoint(tmp_path)
    assert loaded.card.weights_sha256 == card.weights_sha256
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(images), model(images), rtol=0, atol=0)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="resnet20.*fastcnn"):
        build_model("resnet21")
