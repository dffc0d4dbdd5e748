import pytest
import torch
from torch import nn

from model.architectures import build_model, parameter_count
from model.resnet import BLOCKS, Bottleneck

# Counts for the CIFAR stem (3x3 conv, 10 classes); the ImageNet models differ only in stem and head.
EXPECTED_PARAMETERS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
}


@pytest.mark.parametrize("architecture", BLOCKS)
def test_parameter_count_matches_the_published_layout(architecture):
    assert parameter_count(build_model(architecture)) == EXPECTED_PARAMETERS[architecture]


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_any_batch_size_gives_one_logit_row_per_image(architecture, batch_size):
    model = build_model(architecture).eval()
    with torch.inference_mode():
        logits = model(torch.randn(batch_size, 3, 32, 32))
    assert logits.shape == (batch_size, 10)


def test_stem_keeps_full_resolution_and_stages_halve_at_their_first_block():
    model = build_model("resnet50").eval()
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    with torch.inference_mode():
        model(torch.randn(2, 3, 32, 32))
    assert sizes == {
        "layer1": (256, 32, 32), "layer2": (512, 16, 16), "layer3": (1024, 8, 8), "layer4": (2048, 4, 4),
    }
    assert model.layer2[0].conv2.stride == (2, 2)
    assert all(block.conv2.stride == (1, 1) for block in model.layer2[1:])


def test_projection_shortcut_exists_only_where_the_shape_changes():
    model = build_model("resnet50")
    with_projection = [
        name for name, module in model.named_modules()
        if isinstance(module, Bottleneck) and module.downsample is not None
    ]
    assert with_projection == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    resnet18 = build_model("resnet18")
    assert resnet18.layer1[0].downsample is None
    assert isinstance(resnet18.layer2[0].downsample, nn.Sequential)


def test_zero_init_residual_makes_every_branch_start_at_zero():
    model = build_model("resnet50", zero_init_residual=True)
    last = [m.bn3.weight for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(last) == 16
    assert all(torch.count_nonzero(weight) == 0 for weight in last)
    default = build_model("resnet50")
    assert torch.all(default.layer1[0].bn3.weight == 1)
