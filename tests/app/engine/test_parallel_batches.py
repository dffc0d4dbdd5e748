"""With several device threads, waiting images are shared out among the idle ones, not sent as one batch
to one thread while the others idle (the lockstep that benchmarks/compare.py measured at concurrency 8)."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from app.engine.engine import InferenceEngine
from app.engine.served_model import ServedModel

pytestmark = pytest.mark.anyio


async def batch_sizes(checkpoint, monkeypatch, parallel_batches: int, requests: int) -> list[int]:
    """The sizes of the forward passes that answer ``requests`` one-image requests sent at once. With
    several device threads, every pass waits at a barrier for the others, so the test fails (the barrier
    breaks) unless that many passes really run at the same time."""
    engine = InferenceEngine(torch.device("cpu"), max_batch_size=16, max_batch_delay_s=0.02, max_queue=64,
                             parallel_batches=parallel_batches)
    sizes: list[int] = []
    together = threading.Barrier(parallel_batches, timeout=30)
    original = ServedModel.outputs

    def recorded(self, batch):
        sizes.append(len(batch))
        together.wait()
        return original(self, batch)

    await engine.start()
    try:
        await engine.swap(checkpoint)  # warm-up passes run one at a time: the barrier comes after
        monkeypatch.setattr(ServedModel, "outputs", recorded)
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        await asyncio.gather(*(engine.predict([pixels], timeout=60) for _ in range(requests)))
    finally:
        await engine.stop(timeout=30)
    return sizes


async def test_waiting_images_are_shared_among_idle_device_threads(tiny_checkpoint, monkeypatch):
    assert await batch_sizes(tiny_checkpoint, monkeypatch, parallel_batches=2, requests=8) == [4, 4]


async def test_one_device_thread_still_takes_the_whole_queue(tiny_checkpoint, monkeypatch):
    assert await batch_sizes(tiny_checkpoint, monkeypatch, parallel_batches=1, requests=8) == [8]
