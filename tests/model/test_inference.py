"""model/inference.py: each backend computes what the float32 model computes, within its stated tolerance.

Random-init weights: a fresh network's BatchNorm layers are the identity (mean 0, variance 1, γ 1, β 0),
which would make folding trivially right, so every test gives them the statistics of a trained model.
"""

import pytest
import torch
from torch import fx, nn

from model.inference import (
    BACKENDS,
    DEFAULT_CPU_BACKEND,
    fold_batchnorm,
    prepare_for_inference,
    quantize_int8,
)
from model.architectures import build_model

# Folding reorders float32 arithmetic; measured differences are ~1e-7 of the logits' scale.
FUSED_RELATIVE_TOLERANCE = 1e-4
# int8 rounds every activation to 1/256 of its calibrated range; measured cosine 0.9993 on resnet18.
INT8_MIN_COSINE = 0.99
# bf16 keeps 8 of float32's 24 mantissa bits: relative rounding 2^-9 per operation.
BF16_MIN_COSINE = 0.999


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trained_like(architecture: str = "resnet18", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(architecture).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) * 0.5 + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return model


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(batch.contiguous(memory_format=torch.channels_last)).float()


def batchnorms(module: nn.Module) -> int:
    return sum(isinstance(child, nn.BatchNorm2d) for child in module.modules())


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_fused_model_matches_fp32_and_has_no_batchnorm_left(architecture):
    model = trained_like(architecture)
    batch = images(4, seed=2)
    reference = logits(model, batch)
    fused = prepare_for_inference(model, "cpu", "fused")
    assert batchnorms(fused) == 0
    assert batchnorms(model) > 0, "the caller's model must be left as it was"
    scale = reference.abs().max()
    assert (logits(fused, batch) - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * scale


def test_fastcnn_folds_the_batchnorm_after_each_stage_convolution_and_matches_fp32():
    """fastcnn's BatchNorms are a subclass (ShiftOnlyBatchNorm); each stage's first one reads a max-pool,
    not a convolution, so it stays, and the second one folds."""
    model = trained_like("fastcnn")
    batch = images(4, seed=3)
    reference = logits(model, batch)
    fused = prepare_for_inference(model, "cpu", "fused")
    assert (batchnorms(model), batchnorms(fused)) == (6, 3)
    scale = reference.abs().max()
    assert (logits(fused, batch) - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * scale


def test_fused_is_the_default_and_runs_channels_last():
    assert DEFAULT_CPU_BACKEND == "fused"
    fused = prepare_for_inference(trained_like(), "cpu")
    assert isinstance(fused, fx.GraphModule)
    assert fused.get_submodule("conv1").weight.is_contiguous(memory_format=torch.channels_last)


def test_eager_is_the_model_itself_in_channels_last():
    model = trained_like()
    batch = images(3, seed=4)
    reference = logits(model, batch)
    eager = prepare_for_inference(model, "cpu", "eager")
    assert batchnorms(eager) == batchnorms(model)
    assert torch.allclose(logits(eager, batch), reference, atol=1e-6)


def test_int8_agrees_with_fp32_within_its_tolerance():
    model = trained_like()
    batch = images(32, seed=5)
    reference = logits(model, batch)
    quantized = prepare_for_inference(model, "cpu", "int8", calibration=images(128, seed=6))
    result = logits(quantized, batch)
    assert nn.functional.cosine_similarity(result, reference).min() >= INT8_MIN_COSINE
    assert (result.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    assert any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in quantized.modules())


def test_onnx_matches_fp32():
    pytest.importorskip("onnxruntime", reason="the onnx backend is opt-in: pip install -e '.[onnx]'")
    model = trained_like()
    batch = images(3, seed=9)
    reference = logits(model, batch)
    result = logits(prepare_for_inference(model, "cpu", "onnx"), batch)
    assert (result - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * reference.abs().max()


def test_bf16_agrees_with_fp32_within_its_tolerance():
    model = trained_like()
    batch = images(16, seed=8)
    reference = logits(model, batch)
    result = logits(prepare_for_inference(model, "cpu", "bf16"), batch)
    assert result.dtype == torch.float32
    assert nn.functional.cosine_similarity(result, reference).min() >= BF16_MIN_COSINE


def test_int8_needs_calibration_images():
    with pytest.raises(ValueError, match="calibration"):
        prepare_for_inference(trained_like(), "cpu", "int8")
    with pytest.raises(ValueError, match="empty"):
        quantize_int8(trained_like(), [])


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(BACKENDS)):
        prepare_for_inference(trained_like(), "cpu", "tensorrt")


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(build_model("resnet18").train())


class SharedConvolution(nn.Module):
    """A convolution whose output feeds a BatchNorm and, directly, the output too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return self.bn(features) + features


def test_batchnorm_is_not_folded_into_a_convolution_that_feeds_something_else():
    model = SharedConvolution().eval()
    model.bn.running_mean.fill_(0.5)
    batch = images(2, seed=7)
    folded = fold_batchnorm(model)
    assert batchnorms(folded) == 1
    assert torch.allclose(logits(folded, batch), logits(model, batch), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_the_model_as_trained_whatever_the_backend():
    prepared = prepare_for_inference(trained_like(), "cuda", "fused")
    assert batchnorms(prepared) > 0
    assert next(prepared.parameters()).is_cuda
