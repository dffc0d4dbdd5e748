"""APP_CPU_BACKEND: the engine serves the model in the form model/inference.py prepares (default auto, which
is fused without a backend report; app/engine/backend_choice.py and its tests decide the rest)."""

from typing import get_args

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.config import Settings
from app.engine.backend_choice import CPU_BACKEND_SETTINGS, CUDA_PRECISION_SETTINGS, BackendPolicy
from app.engine.calibration import CalibrationUnavailable, calibration_pixels
from app.engine.engine import InferenceEngine
from app.engine.served_model import ServedModel

pytestmark = pytest.mark.anyio


def batchnorms(model: ServedModel) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.network.modules())


def test_the_setting_takes_the_known_backends_and_refuses_others(monkeypatch):
    assert Settings().cpu_backend == "auto" and Settings().cuda_precision == "auto"
    assert Settings().max_accuracy_drop == 0.2
    assert set(get_args(Settings.model_fields["cpu_backend"].annotation)) == set(CPU_BACKEND_SETTINGS)
    assert set(get_args(Settings.model_fields["cuda_precision"].annotation)) == set(CUDA_PRECISION_SETTINGS)
    for backend in ("eager", "bf16", "int8"):
        monkeypatch.setenv("APP_CPU_BACKEND", backend)
        assert Settings().cpu_backend == backend
    monkeypatch.setenv("APP_CPU_BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="cpu_backend"):
        Settings()


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pixels(count: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))


def test_fused_and_eager_models_give_the_same_logits(tiny_checkpoint, one_thread):
    fused = ServedModel.load(tiny_checkpoint, torch.device("cpu"))
    eager = ServedModel.load(tiny_checkpoint, torch.device("cpu"), BackendPolicy(cpu_backend="eager"))
    batch = pixels(4)
    assert (fused.backend, batchnorms(fused)) == ("fused", 0) and "no backend report" in fused.backend_reason
    assert eager.backend == "eager" and batchnorms(eager) > 0
    assert torch.allclose(fused.logits(fused.normalise(batch)),
                          eager.logits(eager.normalise(batch)), atol=1e-5)


@pytest.mark.isa
@pytest.mark.parametrize("backend", ["onnx", "bf16", "int8"])
def test_opt_in_backends_serve_close_to_fused(tiny_checkpoint, synthetic_cifar10, one_thread, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx backend is opt-in: pip install -e '.[onnx]'")
    # tiny_checkpoint has no calibration.safetensors: int8 falls back to APP_DATA_DIR's training images.
    policy = BackendPolicy(cpu_backend=backend, data_dir=synthetic_cifar10)
    served = ServedModel.load(tiny_checkpoint, torch.device("cpu"), policy)
    fused = ServedModel.load(tiny_checkpoint, torch.device("cpu"))
    batch = pixels(8)
    result = torch.softmax(served.logits(served.normalise(batch)), dim=1)
    dtype = {"onnx": "float32", "bf16": "bfloat16", "int8": "int8"}[backend]
    assert served.backend == backend and served.dtype.startswith(dtype)
    assert result.dtype == torch.float32 and torch.allclose(result.sum(dim=1), torch.ones(8), atol=1e-4)
    assert (result - torch.softmax(fused.logits(fused.normalise(batch)), dim=1)).abs().max() < 0.1


def test_fallback_calibration_images_come_from_the_training_set_in_the_data_dir(synthetic_cifar10, tmp_path):
    images = calibration_pixels(synthetic_cifar10, count=16)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    with pytest.raises(CalibrationUnavailable, match="APP_DATA_DIR"):
        calibration_pixels(tmp_path)


async def test_the_engine_prepares_every_model_it_swaps_in_with_its_backend(tiny_checkpoint):
    engine = InferenceEngine(torch.device("cpu"), max_batch_size=4, max_batch_delay_s=0.001, max_queue=16,
                             backend_policy=BackendPolicy(cpu_backend="eager"))
    await engine.start()
    try:
        await engine.swap(tiny_checkpoint)
        assert engine.model.backend == "eager" and batchnorms(engine.model) > 0
        assert engine.model.backend_reason.startswith("eager: set by APP_CPU_BACKEND")
    finally:
        await engine.stop(timeout=30)


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo pwned > planted",))


def test_calibration_never_runs_code_a_planted_batch_file_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _Planted()}))
    with pytest.raises(CalibrationUnavailable, match="posix.system|os.system"):
        calibration_pixels(tmp_path)
    assert not (tmp_path / "planted").exists() and not Path("planted").exists()
