"""The engine on CUDA: bf16 autocast (asked for explicitly: these random-init checkpoints have no backend
report, so auto would serve fp32), pinned staging, batched = single answers, hot swap. Skipped where no
GPU is visible; benchmarks/gpu/run.sh runs them on the GPU machine with `-m gpu`."""

import asyncio

import numpy as np
import pytest
import torch

from app.engine.backend_choice import BackendPolicy
from app.engine.engine import InferenceEngine
from tests.support.checkpoints import make_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# bf16 autocast keeps 8 bits of mantissa; probabilities of one image computed alone or among others may
# differ by cuDNN's choice of kernel per batch size, well below this.
BF16_TOLERANCE = 2e-2


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def pixels(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8))


async def cuda_engine(checkpoint, **options) -> InferenceEngine:
    settings = dict(max_batch_size=64, max_batch_delay_s=0.005, max_queue=1024,
                    backend_policy=BackendPolicy(cuda_precision="bf16")) | options
    engine = InferenceEngine(torch.device("cuda"), **settings)
    await engine.start()
    await engine.swap(checkpoint)
    return engine


async def test_cuda_engine_serves_bf16_and_batched_answers_equal_single_ones(tmp_path):
    engine = await cuda_engine(make_checkpoint(tmp_path / "a", seed=1, architecture="resnet50"))
    try:
        assert engine.model.device.type == "cuda"
        assert engine.model.dtype.startswith("bfloat16")
        images = pixels(48)
        singles = [softmax((await engine.predict([image], timeout=30)).logits) for image in images]
        together = [softmax(result.logits) for result in
                    await asyncio.gather(*(engine.predict([image], timeout=30) for image in images))]
        for alone, batched in zip(singles, together):
            assert batched.shape == alone.shape
            assert np.allclose(batched, alone, atol=BF16_TOLERANCE)
    finally:
        await engine.stop(timeout=30)


async def test_cuda_hot_swap_under_load_fails_nothing_and_never_mixes(tmp_path):
    first = make_checkpoint(tmp_path / "first", seed=1)
    second = make_checkpoint(tmp_path / "second", seed=2)
    engine = await cuda_engine(first)
    old, versions = engine.version, []
    try:
        async def client(seed: int) -> None:
            for step in range(40):
                result = await engine.predict(pixels(2, seed * 100 + step), timeout=30)
                versions.append(result.card.version)

        load = asyncio.gather(*(client(seed) for seed in range(16)))
        await asyncio.sleep(0.2)
        new = (await engine.swap(second)).version
        await load
    finally:
        await engine.stop(timeout=30)
    assert len(versions) == 16 * 40
    assert set(versions) == {old, new}
    switched = versions.index(new)
    assert old not in versions[switched + 16:]  # at most the requests already in flight finish on the old one


async def test_cuda_auto_serves_fp32_without_a_backend_report(tmp_path):
    engine = await cuda_engine(make_checkpoint(tmp_path / "a", seed=1), backend_policy=BackendPolicy())
    try:
        assert engine.model.backend == "fp32" and engine.model.dtype == "float32"
        assert "no backend report" in engine.model.backend_reason
        result = await engine.predict(pixels(2), timeout=30)
        # The engine answers logits (ModelOutput); float32 on CUDA means no autocast anywhere on the path.
        assert result.logits.shape == (2, 10) and result.logits.dtype == np.float32
        assert np.isfinite(result.logits).all()
    finally:
        await engine.stop(timeout=30)
