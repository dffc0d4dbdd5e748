import pytest
import torch
from torch import nn

from model.architectures import build_model, parameter_count
from model.cifar_resnet import DEPTHS, CifarBasicBlock, ZeroPadShortcut

# He et al. 2015, Table 6: 0.27 M, 0.46 M, 0.66 M, 0.85 M and 1.7 M parameters.
PAPER_MILLIONS = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}


@pytest.mark.parametrize("architecture", DEPTHS)
def test_parameter_count_is_the_papers(architecture):
    millions = parameter_count(build_model(architecture)) / 1e6
    assert millions == pytest.approx(PAPER_MILLIONS[architecture], abs=0.005 if millions < 1 else 0.05)


@pytest.mark.parametrize("architecture, n", list(DEPTHS.items()))
def test_depth_is_6n_plus_2_weighted_layers(architecture, n):
    model = build_model(architecture)
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 * n + 2
    assert int(architecture.removeprefix("resnet")) == 6 * n + 2


def test_three_stages_of_16_32_64_channels_at_32_16_8_pixels():
    model = build_model("resnet20").eval()
    sizes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:])))
    with torch.inference_mode():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert sizes == {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}


def test_shortcut_is_option_a_where_the_shape_changes_and_identity_elsewhere():
    model = build_model("resnet56")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, CifarBasicBlock)}
    padded = [name for name, block in blocks.items() if isinstance(block.shortcut, ZeroPadShortcut)]
    assert padded == ["layer2.0", "layer3.0"]
    assert all(isinstance(b.shortcut, nn.Identity) for name, b in blocks.items() if name not in padded)
    assert all(parameter_count(blocks[name].shortcut) == 0 for name in padded)


def test_zero_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_zero_init_residual_zeroes_the_last_norm_of_every_block():
    model = build_model("resnet20", zero_init_residual=True)
    last = [m.bn2.weight for m in model.modules() if isinstance(m, CifarBasicBlock)]
    assert len(last) == 9 and all(torch.count_nonzero(w) == 0 for w in last)
