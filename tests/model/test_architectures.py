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


@pytest.mark.parametrize("architecture", ["resnet20", "fastcnn"])
@pytest.mark.parametrize("backend", ["fused", "bf16", "int8"])
def test_every_cpu_backend_prepares_the_small_families(architecture, backend):
    from model.inference import prepare_for_inference

    torch.manual_seed(0)
    model = build_model(architecture).eval()
    images = torch.randn(6, 3, 32, 32)
    calibration = {"calibration": torch.randn(32, 3, 32, 32)} if backend == "int8" else {}
    prepared = prepare_for_inference(model, "cpu", backend, **calibration)
    with torch.inference_mode():
        reference, served = model(images), prepared(images)
    assert served.shape == (6, 10) and served.dtype == torch.float32 and torch.isfinite(served).all()
    if backend == "fused":  # an exact rewrite
        torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
