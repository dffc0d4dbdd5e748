"""Admission and fairness in the engine: round-robin batches, the single-image reserve, per-client limits, and
cancelled requests leaving the queue uncomputed (issue 22, item 3).

The device is held with a gate (``held_passes``) rather than slowed with sleeps, so every request of a test
is queued before the first batch it is judged on is formed, whatever the machine's load."""

import asyncio
import threading

import numpy as np
import pytest

from app.engine.errors import QueueFull
from app.engine.served_model import ServedModel
from tests.app.engine.test_engine import images, started_engine
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


class HeldPasses:
    """Once ``arm``ed (after the model's warm-up), forward passes wait for ``release``; ``passes`` counts those
    that started, ``images`` their images."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.armed = False
        self.passes = 0
        self.images = 0

    def arm(self) -> None:
        self.armed = True

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def held_passes(monkeypatch):
    held = HeldPasses()
    original = ServedModel.outputs

    def held_logits(self, batch):
        if not held.armed:
            return original(self, batch)
        held.passes += 1
        held.images += len(batch)
        held.gate.wait()
        return original(self, batch)

    monkeypatch.setattr(ServedModel, "outputs", held_logits)
    yield held
    held.release()  # a failed test must not leave a device thread waiting for good


def record_batches(engine) -> list[list[tuple[str, int]]]:
    """Each batch the engine forms, as (request tag, images taken from it), in the batch's order."""
    formed: list[list[tuple[str, int]]] = []
    take = engine._take

    def recording(room: int):
        batch = take(room)
        formed.append([(work.tag, stop - start) for work, start, stop in batch])
        return batch

    engine._take = recording
    return formed


async def test_a_flood_of_batch_requests_cannot_starve_a_single_image(tiny_checkpoint, held_passes):
    async with started_engine(tiny_checkpoint, max_batch_size=8, max_batch_delay_s=0.0, max_queue=128) as engine:
        held_passes.arm()
        formed = record_batches(engine)
        blocker = asyncio.ensure_future(engine.predict(images(1), timeout=60, tag="blocker"))
        await eventually(lambda: held_passes.passes == 1, what="the blocker's pass to start")
        flood = [asyncio.ensure_future(engine.predict(images(16, seed=n), timeout=60, tag=f"batch{n}"))
                 for n in range(4)]
        single = asyncio.ensure_future(engine.predict(images(1, seed=9), timeout=60, tag="single"))
        await eventually(lambda: engine.queued_images == 65, what="the flood and the single to queue")
        held_passes.release()
        await asyncio.gather(blocker, *flood, single)
    after_blocker = formed[1:]
    # First come, first served would have computed all 64 flood images (8 passes) before the single one.
    assert ("single", 1) in after_blocker[0], after_blocker[0]
    assert after_blocker[0] == [("batch0", 2), ("batch1", 2), ("batch2", 2), ("batch3", 1), ("single", 1)]
    assert sum(count for batch in after_blocker for _, count in batch) == 65


async def test_a_request_not_finished_goes_behind_the_ones_waiting(tiny_checkpoint, held_passes):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0, max_queue=128) as engine:
        held_passes.arm()
        formed = record_batches(engine)
        blocker = asyncio.ensure_future(engine.predict(images(1), timeout=60, tag="blocker"))
        await eventually(lambda: held_passes.passes == 1, what="the blocker's pass to start")
        big = asyncio.ensure_future(engine.predict(images(12), timeout=60, tag="big"))
        singles = [asyncio.ensure_future(engine.predict(images(1, seed=n), timeout=60, tag=f"single{n}"))
                   for n in range(6)]
        await eventually(lambda: engine.queued_images == 18, what="the requests to queue")
        held_passes.release()
        await asyncio.gather(blocker, big, *singles)
    # big, single0..2 first; then the three singles still waiting come before big again.
    assert formed[1] == [("big", 1), ("single0", 1), ("single1", 1), ("single2", 1)]
    assert formed[2] == [("single3", 1), ("single4", 1), ("single5", 1), ("big", 1)]
    assert [batch for batch in formed[3:]] == [[("big", 4)], [("big", 4)], [("big", 2)]]


async def test_answers_stay_in_order_when_batches_interleave_requests(tiny_checkpoint):
    inputs = [images(5, seed=n) for n in range(3)]
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        alone = [np.stack([(await engine.predict([item], timeout=60)).logits[0] for item in request])
                 for request in inputs]
        together = await asyncio.gather(*(engine.predict(request, timeout=60) for request in inputs))
    for expected, result in zip(alone, together):
        assert np.allclose(result.logits, expected, atol=1e-5)


async def test_the_last_images_of_the_queue_are_kept_for_single_image_requests(tiny_checkpoint, held_passes):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0, max_queue=16,
                              single_image_reserve=4) as engine:
        held_passes.arm()
        blocker = asyncio.ensure_future(engine.predict(images(1), timeout=60))
        await eventually(lambda: held_passes.passes == 1, what="the blocker's pass to start")
        batch = asyncio.ensure_future(engine.predict(images(12), timeout=60))
        await eventually(lambda: engine.queued_images == 12, what="the batch request to queue")
        with pytest.raises(QueueFull, match="APP_SINGLE_IMAGE_RESERVE"):
            await engine.predict(images(2), timeout=60)
        singles = [asyncio.ensure_future(engine.predict(images(1, seed=n), timeout=60)) for n in range(4)]
        await eventually(lambda: engine.queued_images == 16, what="the single images to queue")
        with pytest.raises(QueueFull, match="APP_MAX_QUEUE=16"):
            await engine.predict(images(1), timeout=60)
        held_passes.release()
        await asyncio.gather(blocker, batch, *singles)
        assert engine._observer.dropped == {"queue_full": 3}


async def test_a_client_over_its_limit_is_refused_while_others_are_served(tiny_checkpoint, held_passes):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0, max_queue=64,
                              max_client_images=8) as engine:
        held_passes.arm()
        blocker = asyncio.ensure_future(engine.predict(images(1), timeout=60, client="other"))
        await eventually(lambda: held_passes.passes == 1, what="the blocker's pass to start")
        first = asyncio.ensure_future(engine.predict(images(6), timeout=60, client="10.0.0.1"))
        await eventually(lambda: engine.queued_images == 6, what="the client's first request to queue")
        with pytest.raises(QueueFull, match="APP_MAX_CLIENT_IMAGES"):
            await engine.predict(images(3), timeout=60, client="10.0.0.1")
        others = asyncio.ensure_future(engine.predict(images(8), timeout=60, client="10.0.0.2"))
        await eventually(lambda: engine.queued_images == 14, what="another client's request to queue")
        held_passes.release()
        await asyncio.gather(blocker, first, others)
        # Its images left the queue, so the client's share is free again.
        assert len((await engine.predict(images(8), timeout=60, client="10.0.0.1")).logits) == 8
        assert not engine.client_shares


async def test_a_cancelled_request_leaves_the_queue_and_is_never_computed(tiny_checkpoint, held_passes):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        held_passes.arm()
        blocker = asyncio.ensure_future(engine.predict(images(1), timeout=60))
        await eventually(lambda: held_passes.passes == 1, what="the blocker's pass to start")
        gone = asyncio.ensure_future(engine.predict(images(5), timeout=60, client="gone"))
        await eventually(lambda: engine.queued_images == 5, what="the request to queue")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert engine.queued_images == 0 and not engine.client_shares
        held_passes.release()
        await blocker
        assert len((await engine.predict(images(2), timeout=60)).logits) == 2
    assert engine._observer.dropped == {"cancelled": 5}
    assert held_passes.images == 3, "the cancelled request's images were computed"
