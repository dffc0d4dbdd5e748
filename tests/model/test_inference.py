"""model/inference.py: each backend computes what the float32 model computes, within its stated tolerance.

Random-init weights: a fresh network's BatchNorm layers are the identity (mean 0, variance 1, γ 1, β 0),
which would make folding trivially right, so every test gives them the statistics of a trained model.
"""

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from model.architectures import ARCHITECTURES, build_model
from model.inference import (
    BACKENDS,
    available_cpu_backends,
    fold_batchnorm,
    prepare_for_inference,
    quantize_int8,
)
from tests.support import REPO_ROOT
from tests.support.waiting import wait_until

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


# One network of each block family: ImageNet-width basic blocks, He et al.'s CIFAR blocks, fastcnn's stages.
FAMILIES = ["resnet18", "resnet20", "fastcnn"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_folds_every_batchnorm_exactly(architecture):
    model = trained_like(architecture)
    batch = images(2, seed=2)
    reference = logits(model, batch)
    fused = prepare_for_inference(model, "cpu", "fused")
    assert batchnorms(fused) == 0
    assert type(fused) is type(model)
    assert batchnorms(model) > 0, "the caller's model must be left as it was"
    scale = reference.abs().max()
    assert (logits(fused, batch) - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * scale


def test_a_negative_scale_keeps_its_batchnorm_behind_the_max_pool():
    model = trained_like("fastcnn")
    with torch.no_grad():
        model.layer2.bn1.weight[3] = -0.5  # fastcnn never trains this scale; here it flips one channel's max
    batch = images(2, seed=3)
    reference = logits(model, batch)
    fused = fold_batchnorm(model)
    assert isinstance(fused.layer2.bn1, nn.BatchNorm2d), "a max over -x is not -max over x: must stay"
    assert batchnorms(fused) == 1
    assert (logits(fused, batch) - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * reference.abs().max()


def test_the_default_backend_folds_batchnorm_and_runs_channels_last():
    fused = prepare_for_inference(trained_like(), "cpu")
    assert batchnorms(fused) == 0
    assert fused.get_submodule("conv1").weight.is_contiguous(memory_format=torch.channels_last)


def test_eager_is_the_model_itself_in_channels_last():
    model = trained_like()
    batch = images(3, seed=4)
    reference = logits(model, batch)
    eager = prepare_for_inference(model, "cpu", "eager")
    assert batchnorms(eager) == batchnorms(model)
    assert torch.allclose(logits(eager, batch), reference, atol=1e-6)


@pytest.mark.isa  # int8's kernels follow the CPU's instruction sets (oneDNN's VNNI ones, or AVX2's)
@pytest.mark.parametrize("architecture", FAMILIES)
def test_int8_agrees_with_fp32_within_its_tolerance(architecture):
    model = trained_like(architecture)
    batch = images(32, seed=5)
    reference = logits(model, batch)
    quantized = prepare_for_inference(model, "cpu", "int8", calibration=images(128, seed=6))
    result = logits(quantized, batch)
    assert nn.functional.cosine_similarity(result, reference).min() >= INT8_MIN_COSINE
    assert (result.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    assert any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in quantized.modules())


@pytest.mark.parametrize("architecture", FAMILIES)
def test_onnx_matches_fp32(architecture):
    pytest.importorskip("onnxruntime", reason="the onnx backend is opt-in: pip install -e '.[onnx]'")
    model = trained_like(architecture)
    batch = images(3, seed=9)
    reference = logits(model, batch)
    result = logits(prepare_for_inference(model, "cpu", "onnx"), batch)
    assert (result - reference).abs().max() <= FUSED_RELATIVE_TOLERANCE * reference.abs().max()


@pytest.mark.isa  # native bf16 dot products on AVX512-BF16, emulated on AVX2
@pytest.mark.parametrize("architecture", FAMILIES)
def test_bf16_agrees_with_fp32_within_its_tolerance(architecture):
    model = trained_like(architecture)
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


def passes_meanwhile(step) -> tuple[int, list[BaseException]]:
    """Run ``step`` while another thread runs forward passes of an unrelated model, each pass under the
    ``pass_gate`` lock; how many passes ran, and their errors."""
    other, batch = trained_like("resnet20"), images(2, seed=11)
    count, errors, stop = [0], [], threading.Event()

    def run_passes() -> None:
        while not stop.is_set():
            with pass_gate:
                try:
                    logits(other, batch)
                    count[0] += 1
                except Exception as error:  # noqa: BLE001 - what the test counts
                    errors.append(error)

    thread = threading.Thread(target=run_passes)
    thread.start()
    try:
        step()
    finally:
        stop.set()
        thread.join()
    return count[0], errors


pass_gate = threading.Lock()


def test_folding_runs_alongside_forward_passes_on_other_threads():
    """torch.fx tracing patches nn.Module.__call__ process-wide; folding without it must not disturb a
    pass running on another thread (the engine's hot swap folds while it serves)."""
    count, errors = passes_meanwhile(lambda: [fold_batchnorm(trained_like(name)) for name in FAMILIES * 2])
    assert errors == [] and count > 0


def test_int8_traces_only_inside_the_tracing_context():
    entries = []

    @contextmanager
    def tracing():
        with pass_gate:  # as the engine's gate: no pass on another thread while torch.fx traces
            entries.append("traced")
            yield

    calibration = images(64, seed=12)
    count, errors = passes_meanwhile(lambda: prepare_for_inference(trained_like("resnet20"), "cpu", "int8",
                                                                   calibration, tracing=tracing))
    assert entries == ["traced"]
    assert errors == [] and count > 0


def test_the_onnx_export_runs_alongside_forward_passes_on_other_threads():
    """The export runs in a child process, so it neither patches nor holds anything here: no gate needed."""
    pytest.importorskip("onnxruntime", reason="the onnx backend is opt-in: pip install -e '.[onnx]'")
    count, errors = passes_meanwhile(lambda: prepare_for_inference(trained_like("fastcnn"), "cpu", "onnx"))
    assert errors == [] and count > 0


def test_the_onnx_export_runs_in_another_process(monkeypatch):
    """In this process the exporter would hold the GIL for seconds of a hot swap."""
    pytest.importorskip("onnxruntime", reason="the onnx backend is opt-in: pip install -e '.[onnx]'")

    def exporting_here(*args, **kwargs):
        raise AssertionError("torch.onnx.export ran in the serving process")

    monkeypatch.setattr(torch.onnx, "export", exporting_here)
    model, batch = trained_like("resnet20"), images(3, seed=5)
    exported = prepare_for_inference(model, "cpu", "onnx")
    torch.testing.assert_close(logits(exported, batch), logits(model, batch), atol=1e-4, rtol=1e-4)


def test_every_backend_is_available_here_or_says_why_not():
    available, missing = available_cpu_backends()
    assert set(available) | set(missing) == set(BACKENDS) and not set(available) & set(missing)
    assert {"eager", "fused", "bf16"} <= set(available)
    assert all(reason for reason in missing.values())


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


def test_the_onnx_export_worker_dies_with_the_process_that_asked_for_it(tmp_path):
    # The service's backend verification exports in a child, which is SIGTERMed when the service stops: its
    # export worker was left running, orphaned, for as long as the export took.
    marker = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-m", "tests.support.stuck_export", str(marker)],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = 0
    try:
        worker = int(wait_until(lambda: marker.exists() and marker.read_text(), what="the export's worker"))
        assert worker != parent.pid
        parent.kill()
        parent.wait()
        wait_until(lambda: not _alive(worker), timeout_s=60, what=f"the orphaned export worker {worker} to end")
    finally:
        parent.kill()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
