"""APP_CPU_BACKEND: the engine serves the model in the form model/inference.py prepares (default fused)."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.config import Settings
from app.engine.engine import InferenceEngine
from app.engine.served_model import ServedModel

pytestmark = pytest.mark.anyio


def batchnorms(model: ServedModel) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.network.modules())


def test_the_setting_defaults_to_fused_and_refuses_unknown_backends(monkeypatch):
    monkeypatch.delenv("APP_CPU_BACKEND", raising=False)
    assert Settings().cpu_backend == "fused"
    monkeypatch.setenv("APP_CPU_BACKEND", "eager")
    assert Settings().cpu_backend == "eager"
    monkeypatch.setenv("APP_CPU_BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="cpu_backend"):
        Settings()


def test_fused_and_eager_models_give_the_same_probabilities(tiny_checkpoint):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = ServedModel.load(tiny_checkpoint, torch.device("cpu"))
        eager = ServedModel.load(tiny_checkpoint, torch.device("cpu"), backend="eager")
        pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        assert (fused.backend, batchnorms(fused)) == ("fused", 0)
        assert eager.backend == "eager" and batchnorms(eager) > 0
        assert torch.allclose(fused.probabilities(fused.normalise(pixels)),
                              eager.probabilities(eager.normalise(pixels)), atol=1e-5)
    finally:
        torch.set_num_threads(previous)


async def test_the_engine_prepares_every_model_it_swaps_in_with_its_backend(tiny_checkpoint):
    engine = InferenceEngine(torch.device("cpu"), max_batch_size=4, max_batch_delay_s=0.001, max_queue=16,
                             cpu_backend="eager")
    await engine.start()
    try:
        await engine.swap(tiny_checkpoint)
        assert engine.model.backend == "eager" and batchnorms(engine.model) > 0
    finally:
        await engine.stop(timeout=30)
