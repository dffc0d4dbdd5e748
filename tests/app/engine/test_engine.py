import asyncio
import os
import shutil
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.engine import PREPARATION_NICENESS, InferenceEngine
from app.engine.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InputSizeChanged,
    NoModelLoaded,
    QueueFull,
    ServiceStopping,
)
from app.engine.served_model import ServedModel
from model.card import WEIGHTS_FILE, CheckpointError, read_card
from tests.support.checkpoints import with_input_size
from tests.support.waiting import eventually, wait_until

pytestmark = pytest.mark.anyio
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """As the service sets it on this 2-core machine: a pass split over both cores stalls when another
    process takes one of them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Recorder:
    """The engine's observer, recording what it reports."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.splits = 0
        self.dropped: dict[str, int] = {}
        self.installed: list[str] = []

    def batch_computed(self, images: int, seconds: float) -> None:
        self.batches.append(images)

    def batch_split(self) -> None:
        self.splits += 1

    def images_dropped(self, count: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def model_installed(self, model: ServedModel) -> None:
        self.installed.append(model.card.version)


@asynccontextmanager
async def started_engine(checkpoint: Path | None, **options):
    settings = dict(max_batch_size=8, max_batch_delay_s=0.01, max_queue=64, observer=Recorder()) | options
    engine = InferenceEngine(torch.device("cpu"), **settings)
    await engine.start()
    if checkpoint is not None:
        await engine.swap(checkpoint)
    try:
        yield engine
    finally:
        await engine.stop(timeout=30)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Pixels up to 200, so a 255 in the first pixel can mark a "poisoned" image."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 200, size=(count, 32, 32, 3), dtype=np.uint8))


@pytest.fixture
def slow_forward(monkeypatch):
    """Make every forward pass take at least ``delay`` seconds; returns the list of batch sizes run."""
    sizes: list[int] = []
    original = ServedModel.outputs

    def install(delay: float) -> list[int]:
        def slow(self, batch):
            sizes.append(len(batch))
            time.sleep(delay)
            return original(self, batch)

        monkeypatch.setattr(ServedModel, "outputs", slow)
        return sizes

    return install


async def test_concurrent_requests_share_forward_passes_and_get_the_single_image_answers(tiny_checkpoint):
    inputs = images(16)
    async with started_engine(tiny_checkpoint) as engine:
        singles = [(await engine.predict([item], timeout=30)).logits[0] for item in inputs]
        recorder = engine._observer
        recorder.batches.clear()
        together = await asyncio.gather(*(engine.predict([item], timeout=30) for item in inputs))
    assert max(recorder.batches) > 1, "concurrent requests were not batched"
    assert max(recorder.batches) <= 8 and sum(recorder.batches) == 16
    for single, batched in zip(singles, together):
        assert np.allclose(batched.logits[0], single, atol=TOLERANCE)
        assert batched.card.version == engine.card.version


async def test_a_request_larger_than_a_batch_spans_several_passes_and_keeps_its_order(tiny_checkpoint):
    inputs = images(20, seed=1)
    async with started_engine(tiny_checkpoint, max_batch_delay_s=0.0) as engine:
        singles = np.stack([(await engine.predict([item], timeout=30)).logits[0] for item in inputs])
        engine._observer.batches.clear()
        result = await engine.predict(inputs, timeout=30)
    assert engine._observer.batches == [8, 8, 4]
    assert np.allclose(result.logits, singles, atol=TOLERANCE)


async def test_pixels_and_prenormalised_tensors_share_a_batch(tiny_checkpoint):
    pixels = images(1, seed=2)[0]
    card = read_card(tiny_checkpoint)
    normalised = ((pixels.transpose(2, 0, 1) / 255.0 - np.array(card.mean)[:, None, None])
                  / np.array(card.std)[:, None, None]).astype(np.float32)
    async with started_engine(tiny_checkpoint) as engine:
        mixed = await engine.predict([pixels, normalised, pixels], timeout=30)
    assert np.allclose(mixed.logits[0], mixed.logits[1], atol=TOLERANCE)
    assert np.allclose(mixed.logits[0], mixed.logits[2], atol=TOLERANCE)


async def test_a_full_queue_refuses_new_work_at_once_and_serves_the_rest(tiny_checkpoint, slow_forward):
    async with started_engine(tiny_checkpoint, max_batch_size=1, max_batch_delay_s=0.0, max_queue=4) as engine:
        started = slow_forward(0.2)
        first = asyncio.ensure_future(engine.predict(images(1), timeout=30))
        await eventually(lambda: started, what="the first image's pass")  # four more now fill the queue
        queued = [asyncio.ensure_future(engine.predict(images(1), timeout=30)) for _ in range(4)]
        await asyncio.sleep(0)
        # At once: the refusal comes before the coroutine first suspends, without waiting for the device.
        refusal = engine.predict(images(1), timeout=30)
        with pytest.raises(QueueFull, match="APP_MAX_QUEUE=4") as refused:
            refusal.send(None)
        assert refused.value.retry_after_s >= 1
        results = await asyncio.gather(first, *queued)
    assert len(results) == 5 and engine._observer.dropped == {"queue_full": 1}


async def test_a_request_past_its_deadline_fails_and_its_queued_images_are_never_computed(tiny_checkpoint,
                                                                                          slow_forward):
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        sizes = slow_forward(0.3)
        busy = asyncio.ensure_future(engine.predict(images(1), timeout=30))
        await eventually(lambda: sizes, what="the busy request's pass")
        with pytest.raises(DeadlineExceeded, match="APP_REQUEST_TIMEOUT_S"):
            await engine.predict(images(3), timeout=0.05)
        assert engine.queued_images == 0
        await busy
        after = await engine.predict(images(1), timeout=30)
    assert sizes == [1, 1], "the expired request's three images must not have been computed"
    assert engine._observer.dropped == {"deadline": 3}
    assert after.logits.shape == (1, 10)


async def test_a_failing_batch_fails_only_its_own_requests(tiny_checkpoint, monkeypatch):
    original = ServedModel.outputs
    poisoned_pass, healthy_queued = threading.Event(), threading.Event()

    def poisoned(self, batch):
        if (batch[:, 0, 0, 0] > 2.0).any():  # a red 255 in the first pixel, normalised
            poisoned_pass.set()
            healthy_queued.wait(30)  # so that the healthy requests queue for another batch
            raise RuntimeError("simulated kernel failure")
        return original(self, batch)

    poison = images(1)[0].copy()
    poison[0, 0, 0] = 255
    async with started_engine(tiny_checkpoint, max_batch_delay_s=0.0) as engine:
        monkeypatch.setattr(ServedModel, "outputs", poisoned)
        failing = asyncio.ensure_future(engine.predict([poison], timeout=30))
        await eventually(poisoned_pass.is_set, what="the poisoned pass")
        healthy = [asyncio.ensure_future(engine.predict(images(1, seed=s), timeout=30)) for s in range(5)]
        await eventually(lambda: engine.queued_images == 5, what="the healthy requests to queue")
        healthy_queued.set()
        healthy = await asyncio.gather(*healthy)
        with pytest.raises(InferenceFailed, match="batch of 1 images") as failed:
            await failing
        assert "simulated kernel failure" not in str(failed.value), "the exception's text is for the log only"
        assert len(healthy) == 5
        assert (await engine.predict(images(1), timeout=30)).logits.shape == (1, 10)
    assert engine._observer.dropped == {}


async def test_out_of_memory_is_retried_by_splitting_the_batch(tiny_checkpoint, monkeypatch):
    inputs = images(8, seed=3)
    async with started_engine(tiny_checkpoint) as engine:
        unsplit = await engine.predict(inputs, timeout=30)
        expected = unsplit.logits
        original = ServedModel.outputs

        def small_memory(self, batch):
            if len(batch) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(self, batch)

        monkeypatch.setattr(ServedModel, "outputs", small_memory)
        result = await engine.predict(inputs, timeout=30)
    assert np.allclose(result.logits, expected, atol=TOLERANCE)
    assert result.features is not None and unsplit.features is not None
    assert np.allclose(result.features, unsplit.features, atol=TOLERANCE), "the features' rows follow the logits'"
    assert engine._observer.splits == 3  # 8 -> 4 + 4 -> (2 + 2) + (2 + 2)


async def test_out_of_memory_on_a_single_image_fails_that_request(tiny_checkpoint, monkeypatch):
    async with started_engine(tiny_checkpoint) as engine:
        def no_memory(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(ServedModel, "outputs", no_memory)
        with pytest.raises(InferenceFailed, match="inference failed on this request"):
            await engine.predict(images(1), timeout=30)


async def test_a_swap_waits_for_a_split_request_so_no_answer_mixes_models(tiny_checkpoint, other_checkpoint,
                                                                         slow_forward):
    inputs = images(12, seed=4)
    async with started_engine(tiny_checkpoint, max_batch_size=4, max_batch_delay_s=0.0) as engine:
        old_version = engine.version
        expected_old = (await engine.predict(inputs, timeout=30)).logits
        sizes = slow_forward(0.15)
        split = asyncio.ensure_future(engine.predict(inputs, timeout=30))  # three passes of four
        await eventually(lambda: sizes, what="the split request's first pass")
        card = await engine.swap(other_checkpoint)
        result = await split
        after = await engine.predict(inputs, timeout=30)
    assert result.card.version == old_version
    assert np.allclose(result.logits, expected_old, atol=TOLERANCE), "rows from the new model leaked in"
    assert card.version != old_version and after.card.version == card.version
    assert not np.allclose(after.logits, expected_old, atol=1e-3)
    assert engine._observer.installed == [old_version, card.version]


async def test_a_checkpoint_that_fails_verification_is_refused_and_the_old_model_keeps_serving(
        tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = bytearray((broken / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (broken / WEIGHTS_FILE).write_bytes(bytes(weights))
    async with started_engine(tiny_checkpoint) as engine:
        version = engine.version
        with pytest.raises(CheckpointError, match="SHA-256"):
            await engine.swap(broken)
        with pytest.raises(CheckpointError, match="no model card"):
            await engine.swap(tmp_path / "nowhere")
        assert engine.version == version
        assert (await engine.predict(images(1), timeout=30)).card.version == version


async def test_a_model_with_another_input_size_takes_over_and_hands_back_the_waiting_requests(
        tiny_checkpoint, tmp_path):
    larger = with_input_size(tiny_checkpoint, tmp_path / "64px", 64)
    # A request that waits for company for up to 30 s: far longer than the swap takes.
    async with started_engine(tiny_checkpoint, max_batch_delay_s=30.0) as engine:
        waiting = asyncio.ensure_future(engine.predict(images(1), timeout=60))
        await asyncio.sleep(0)
        assert engine.queued_images == 1
        await engine.swap(larger)
        with pytest.raises(InputSizeChanged, match="64x64") as handed_back:
            await waiting
        assert handed_back.value.size == engine.input_size == 64 and engine.queued_images == 0
        with pytest.raises(InputSizeChanged, match="not 32x32"):
            await engine.predict(images(1), timeout=30)
        engine.max_batch_delay_s = 0.0
        result = await engine.predict([np.zeros((64, 64, 3), np.uint8)], timeout=30)
    assert result.card.input_size == 64 and result.logits.shape == (1, 10)
    assert engine._observer.dropped == {}, "handed-back images are not dropped: they are sent again"


async def test_stopping_finishes_queued_requests_then_refuses_new_ones(tiny_checkpoint, slow_forward):
    async with started_engine(tiny_checkpoint, max_batch_size=2, max_batch_delay_s=0.0) as engine:
        sizes = slow_forward(0.1)
        pending = [asyncio.ensure_future(engine.predict(images(1, seed=s), timeout=30)) for s in range(5)]
        await eventually(lambda: sizes, what="the first pass")  # the other requests are queued by then
        await engine.stop(timeout=30)
        results = await asyncio.gather(*pending)
        assert all(result.logits.shape == (1, 10) for result in results)
        assert not engine.ready
        with pytest.raises(ServiceStopping):
            await engine.predict(images(1), timeout=30)


async def test_an_empty_request_is_answered_without_a_forward_pass(tiny_checkpoint):
    async with started_engine(tiny_checkpoint) as engine:
        engine._observer.batches.clear()
        result = await engine.predict([], timeout=30)
    assert result.logits.shape == (0, 10) and engine._observer.batches == []


async def test_without_a_model_requests_are_told_why():
    async with started_engine(None) as engine:
        engine.unavailable_reason = "no model: train one"
        assert not engine.ready and engine.card is None and engine.version is None
        with pytest.raises(NoModelLoaded, match="train one"):
            await engine.predict(images(1), timeout=30)


async def test_a_forward_pass_runs_while_another_model_is_being_prepared(tiny_checkpoint, other_checkpoint,
                                                                        monkeypatch):
    """Swaps never pause inference (issue 11): the new model's preparation holds back no forward pass of the
    serving one; only the step it brackets with ``tracing`` (int8's fx trace) does."""
    import app.engine.served_model as served_model

    preparing, release, tracing_hooks, niceness = threading.Event(), threading.Event(), [], []
    prepare = served_model.prepare_for_inference

    def held_preparation(*args, **kwargs):
        tracing_hooks.append(kwargs["tracing"])
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        preparing.set()
        release.wait(60)
        return prepare(*args, **kwargs)

    async with started_engine(tiny_checkpoint) as engine:
        old = engine.version
        monkeypatch.setattr(served_model, "prepare_for_inference", held_preparation)
        swap = asyncio.ensure_future(engine.swap(other_checkpoint))
        try:
            await eventually(preparing.is_set, what="the new model's preparation to start")
            result = await engine.predict(images(3), timeout=30)
            assert result.card.version == old and result.logits.shape == (3, 10)
            assert not swap.done(), "the answer came while the new model was still being prepared"
        finally:
            release.set()
        card = await swap
    assert card.version != old and tracing_hooks == [engine._preparation_gate.exclusive]
    assert niceness == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + PREPARATION_NICENESS)], "a background thread"


def test_tracing_a_model_waits_for_running_passes_and_holds_new_ones_back():
    """torch.fx's tracer (int8's prepare_fx) patches nn.Module.__call__ process-wide, so no forward pass may
    run while a model is traced."""
    from app.engine.engine import _PreparationGate

    gate, events = _PreparationGate(), []
    pass_running, release_pass = threading.Event(), threading.Event()

    def forward_pass(name: str, hold: threading.Event | None = None) -> None:
        with gate.shared():
            events.append(f"{name} start")
            if hold is not None:
                pass_running.set()
                hold.wait(30)
            events.append(f"{name} end")

    def prepare() -> None:
        with gate.exclusive():
            events.append("prepare start")
            events.append("prepare end")

    def waiting_threads() -> int:
        return len(gate._condition._waiters)  # threads blocked in the gate's condition (CPython's Condition)

    first = threading.Thread(target=forward_pass, args=("first", release_pass))
    first.start()
    pass_running.wait(30)
    preparing = threading.Thread(target=prepare)
    preparing.start()
    wait_until(lambda: waiting_threads() == 1, what="the preparation to wait for the running pass")
    late = threading.Thread(target=forward_pass, args=("late",))
    late.start()
    wait_until(lambda: waiting_threads() == 2, what="the late pass to wait for the preparation")
    assert events == ["first start"]
    release_pass.set()
    for thread in (first, preparing, late):
        thread.join(30)
    assert events == ["first start", "first end", "prepare start", "prepare end", "late start", "late end"]
