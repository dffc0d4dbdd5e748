"""With several device threads, waiting images are shared out among the idle ones, not sent as one batch
to one thread while the others idle (the lockstep that benchmarks/compare.py measured at concurrency 8)."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from app.engine.engine import InferenceEngine
from app.engine.served_model import ServedModel

pytestmark = pytest.mark.anyio


@pytest.fixture
def recorded_passes(monkeypatch):
    """Every forward pass takes 0.2 s; records (batch size, start time) of each."""
    passes: list[tuple[int, float]] = []
    lock = threading.Lock()
    original = ServedModel.probabilities

    def slow(self, batch):
        with lock:
            passes.append((len(batch), time.monotonic()))
        time.sleep(0.2)
        return original(self, batch)

    monkeypatch.setattr(ServedModel, "probabilities", slow)
    return passes


async def run_requests(checkpoint, passes: list, parallel_batches: int, requests: int) -> None:
    engine = InferenceEngine(torch.device("cpu"), max_batch_size=16, max_batch_delay_s=0.02, max_queue=64,
                             parallel_batches=parallel_batches)
    await engine.start()
    try:
        await engine.swap(checkpoint)
        passes.clear()  # the warm-up's
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        await asyncio.gather(*(engine.predict([pixels], timeout=30) for _ in range(requests)))
    finally:
        await engine.stop(timeout=30)


async def test_waiting_images_are_shared_among_idle_device_threads(tiny_checkpoint, recorded_passes):
    await run_requests(tiny_checkpoint, recorded_passes, parallel_batches=2, requests=8)
    assert [size for size, _ in recorded_passes] == [4, 4], recorded_passes
    assert abs(recorded_passes[1][1] - recorded_passes[0][1]) < 0.15, "the two halves must run at once"


async def test_one_device_thread_still_takes_the_whole_queue(tiny_checkpoint, recorded_passes):
    await run_requests(tiny_checkpoint, recorded_passes, parallel_batches=1, requests=8)
    assert [size for size, _ in recorded_passes] == [8], recorded_passes
