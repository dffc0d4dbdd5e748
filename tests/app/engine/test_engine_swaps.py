"""Swaps that always finish (issue 22, item 4): a model staged while a request is half computed goes in when
the engine goes idle, with no other request; a swap past its timeout, or whose model fails to build, leaves
the old model serving."""

import asyncio
import threading

import pytest

from app.engine.errors import SwapFailed, SwapTimedOut
from app.engine.served_model import ServedModel
from tests.app.engine.test_engine import images, started_engine
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def hold_model(monkeypatch):
    """``hold_model(model)``: that model's forward passes wait for the returned event; others run freely
    (the candidate's warm-up among them)."""
    original = ServedModel.outputs
    held: dict[int, threading.Event] = {}
    started: list[int] = []

    def logits(self, batch):
        if id(self) in held:
            started.append(len(batch))
            held[id(self)].wait()
        return original(self, batch)

    monkeypatch.setattr(ServedModel, "outputs", logits)

    def hold(model: ServedModel) -> tuple[threading.Event, list[int]]:
        held[id(model)] = threading.Event()
        return held[id(model)], started

    yield hold
    for event in held.values():  # a failed test must not leave a device thread waiting for good
        event.set()


async def test_a_swap_staged_mid_request_goes_in_when_the_engine_goes_idle(tiny_checkpoint, other_checkpoint,
                                                                           hold_model):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        old = engine.version
        gate, started = hold_model(engine.model)
        split = asyncio.ensure_future(engine.predict(images(12), timeout=120))  # three passes of four
        await eventually(lambda: started, what="the split request's first pass")
        swap = asyncio.ensure_future(engine.swap(other_checkpoint))
        await eventually(lambda: engine._staged is not None, what="the new model to be staged")
        assert engine.version == old, "installed while a request was half computed"
        gate.set()
        result = await split
        # No other request comes: the engine is idle now, and the staged model must go in by itself.
        card = await asyncio.wait_for(swap, timeout=120)
        assert engine.version == card.version != old
        assert result.card.version == old
        assert engine._observer.installed == [old, card.version]


async def test_while_a_model_is_staged_only_the_requests_begun_are_computed(tiny_checkpoint, other_checkpoint,
                                                                           hold_model):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        old = engine.version
        gate, started = hold_model(engine.model)
        split = asyncio.ensure_future(engine.predict(images(8), timeout=120))
        await eventually(lambda: started, what="the split request's first pass")
        swap = asyncio.ensure_future(engine.swap(other_checkpoint))
        await eventually(lambda: engine._staged is not None, what="the new model to be staged")
        later = asyncio.ensure_future(engine.predict(images(3), timeout=120))
        await eventually(lambda: engine.queued_images == 7, what="the later request to queue")
        gate.set()
        first, second = await split, await later
        card = await swap
    assert first.card.version == old
    assert second.card.version == card.version, "a request that came after the staging began on the old model"


async def test_a_swap_past_its_timeout_fails_and_the_old_model_keeps_serving(tiny_checkpoint, other_checkpoint,
                                                                              hold_model):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        engine.swap_timeout_s = 1.0  # after the first model is in: loading it may take longer on a busy machine
        old = engine.version
        gate, started = hold_model(engine.model)
        split = asyncio.ensure_future(engine.predict(images(12), timeout=120))
        await eventually(lambda: started, what="the split request's first pass")
        with pytest.raises(SwapTimedOut, match="APP_SWAP_TIMEOUT_S"):
            await engine.swap(other_checkpoint)  # the held pass keeps the request half computed
        gate.set()
        assert (await split).card.version == old
        assert engine._staged is None and engine.version == old
        assert (await engine.predict(images(2), timeout=120)).card.version == old


async def test_a_model_that_fails_to_warm_up_is_refused_with_a_clear_error(tiny_checkpoint, other_checkpoint,
                                                                           monkeypatch):
    async with started_engine(tiny_checkpoint) as engine:
        old = engine.version

        def broken(self, sizes):
            raise RuntimeError("simulated backend failure")

        monkeypatch.setattr(ServedModel, "warm_up", broken)
        with pytest.raises(SwapFailed, match="RuntimeError: simulated backend failure"):
            await engine.swap(other_checkpoint)
        assert engine.version == old
        assert (await engine.predict(images(1), timeout=60)).card.version == old
