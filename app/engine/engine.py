"""The inference engine: one model resident on its device, fed by dynamic micro-batching.

Public API (everything else is private)::

    engine = InferenceEngine(torch.device("cpu"), max_batch_size=32, max_batch_delay_s=0.005, max_queue=256)
    await engine.start()                         # starts the batching loop; no model yet
    card = await engine.swap("weights/resnet50")  # load + verify + warm up, then swap in between batches
    result = await engine.predict([pixels], timeout=30.0)   # -> ModelOutput(logits, card)
    engine.input_size, engine.card, engine.version, engine.model, engine.ready, engine.queued_images
    await engine.stop(timeout=30.0)              # refuses new work, finishes what is queued and running

``predict`` takes a list of inputs, each uint8 HWC pixels (``engine.input_size`` square, RGB) or a float32
CHW tensor already normalised; it raises ``QueueFull`` at once when ``max_queue`` images are waiting (a
request of several images already when all but ``single_image_reserve`` are, and a ``client``'s request
when that client has ``max_client_images`` waiting), ``DeadlineExceeded`` after ``timeout`` seconds (its
images are dropped if not yet computed), ``NoModelLoaded`` (with ``engine.unavailable_reason``) before the
first ``swap``, ``InferenceFailed`` when its batch raised, and ``InputSizeChanged`` when a model of another
input size took over before any of its images was computed (the classification pipeline then fits the
images again; ``app/classification/classifier.py``). A cancelled ``predict`` (its client went away) takes
its images that are not yet computed out of the queue.

``swap(path) -> ModelCard`` is how a job system promotes a model: it loads and verifies the checkpoint, chooses
its backend anew (``app.engine.backend_choice``) and warms it up off the batching loop, while the old model
keeps serving every batch (only int8's torch.fx trace holds passes back, ``_PreparationGate``); the new one
is installed between two batches, and never while a request split over several batches is half computed, so
no response mixes models: while a model is staged, batches finish the requests already begun and start no
new one, and it goes in as soon as none is half computed, or when the engine goes idle, without waiting for
another request. Every ``ModelOutput`` carries the card of the model that computed it. Swaps are
serialised, and one that does not finish within ``swap_timeout_s`` is abandoned (``SwapTimedOut``) with the
old model still serving. The engine owns the input size: the new model may take another one, and the
waiting requests fitted to the old size are handed back (``InputSizeChanged``) the moment it is installed.

Batching: the images of all waiting requests are coalesced into forward passes of up to ``max_batch_size``
images, taken round-robin, one image per waiting request in turn, and a request not finished goes to the
back of the line: a single image waits about (waiting requests / batch size) passes however many images
the others sent, where taking images first come, first served made it wait for every one of them. A batch
is dispatched when it is full, or when ``max_batch_delay_s`` has passed since its oldest image arrived and
the device is free; while the device is busy the next batch keeps filling, so the device never idles with
work waiting. The forward pass runs on a device thread (``parallel_batches`` of them),
never on the event loop. A batch that raises fails only its own requests; a CUDA out-of-memory error is
retried by splitting the batch in halves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from app.engine.backend_choice import DEFAULT_POLICY, BackendPolicy
from app.engine.client_shares import ClientShares
from app.engine.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InputSizeChanged,
    NoModelLoaded,
    QueueFull,
    ServiceStopping,
    SwapFailed,
    SwapTimedOut,
)
from app.engine.served_model import BatchStager, ServedModel
from model.card import CheckpointError, ModelCard
from model.features import GaussianStatistics

logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Where the engine reports what it does (the service's Prometheus metrics implement this)."""

    def batch_computed(self, images: int, seconds: float) -> None: ...
    def batch_split(self) -> None: ...
    def images_dropped(self, count: int, reason: str) -> None: ...
    def model_installed(self, model: ServedModel) -> None: ...


@dataclass(frozen=True)
class ModelOutput:
    logits: np.ndarray  # (images, classes), float32, rows in input order
    card: ModelCard  # of the model that computed every row
    features: np.ndarray | None = None  # (images, D), float32, the same pass's (model.features); same rows
    ood_statistics: GaussianStatistics | None = None  # of the model that computed them, for its card's rule


@dataclass(eq=False)
class _Work:
    """One request's images; it may span several batches, all computed by the same model."""

    inputs: Sequence[np.ndarray]
    size: int  # the side of every input's square
    future: asyncio.Future[ModelOutput]
    enqueued_at: float
    tag: str | None
    client: str | None = None
    taken: int = 0  # images handed to a forward pass
    delivered: int = 0
    queued: bool = True  # some images still wait in the queue
    logits: np.ndarray | None = None
    features: np.ndarray | None = None


_Slice = tuple[_Work, int, int]


class InferenceEngine:
    def __init__(
        self,
        device: torch.device,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        parallel_batches: int = 1,
        single_image_reserve: int = 0,
        max_client_images: int = 0,
        swap_timeout_s: float = 600.0,
        backend_policy: BackendPolicy = DEFAULT_POLICY,
        observer: EngineObserver | None = None,
    ) -> None:
        self.device = device
        self.backend_policy = backend_policy  # decided again for every checkpoint swapped in
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.parallel_batches = parallel_batches
        # The last images of the queue that only single-image requests may take, so a flood of batch
        # requests cannot answer every other client with 503; 0 = none.
        self.single_image_reserve = single_image_reserve
        self.client_shares = ClientShares(max_client_images)
        self.swap_timeout_s = swap_timeout_s
        self.unavailable_reason = "no model is loaded yet"
        self._observer = observer
        self._stager = BatchStager(device, max_batch_size)
        self._device_threads = ThreadPoolExecutor(parallel_batches, thread_name_prefix="inference")
        # Preparing a model is background work: its thread yields the cores to the serving model's passes.
        self._preparation_thread = ThreadPoolExecutor(1, thread_name_prefix="model-preparation",
                                                      initializer=_lower_this_threads_priority)
        self._pending: deque[_Work] = deque()
        self._queued = 0
        self._active: ServedModel | None = None
        self._staged: ServedModel | None = None
        self._installed: asyncio.Future[None] | None = None
        self._swap_lock = asyncio.Lock()
        self._preparation_gate = _PreparationGate()
        self._wakeup: asyncio.Future[None] | None = None
        self._serving: asyncio.Task[None] | None = None
        self._stopping = False
        self._seconds_per_image = 0.0

    # -- state -----------------------------------------------------------------------------------------

    @property
    def model(self) -> ServedModel | None:
        return self._active

    @property
    def input_size(self) -> int:
        """The side of the square inputs the serving model takes; ``NoModelLoaded`` before the first swap."""
        if self._active is None:
            raise NoModelLoaded(self.unavailable_reason)
        return self._active.card.input_size

    @property
    def card(self) -> ModelCard | None:
        return self._active.card if self._active else None

    @property
    def version(self) -> str | None:
        return self._active.card.version if self._active else None

    @property
    def ready(self) -> bool:
        """A warmed-up model is serving and the engine takes requests."""
        return self._active is not None and not self._stopping

    @property
    def queued_images(self) -> int:
        return self._queued

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._serving = asyncio.create_task(self._serve(), name="inference-batching")

    async def stop(self, timeout: float) -> None:
        """Refuse new requests, finish the queued and running ones (up to ``timeout`` s), then stop."""
        self._stopping = True
        self.unavailable_reason = "the service is shutting down"
        self._notify()
        if self._serving is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._serving), timeout)
            except TimeoutError:
                logger.warning("stopping with %d images still queued after %.0f s", self._queued, timeout)
                self._serving.cancel()
                for work in list(self._pending):
                    self._remove(work, "shutdown")
                    if not work.future.done():
                        work.future.set_exception(ServiceStopping("the service stopped before this request ran"))
        self._device_threads.shutdown(wait=False, cancel_futures=True)
        self._preparation_thread.shutdown(wait=False, cancel_futures=True)

    async def swap(self, checkpoint: str | Path, origin: str = "") -> ModelCard:
        """Load, verify and warm up ``checkpoint``, then serve it from the next batch on; returns its card.
        ``origin`` says why this checkpoint is served; ``GET /model`` shows it.

        Raises ``CheckpointError`` (unreadable or unverifiable checkpoint), ``SwapFailed`` (it could not be
        served otherwise) or ``SwapTimedOut`` (not in service within ``swap_timeout_s``); the serving model
        then stays in place."""
        async with self._swap_lock:
            if self._stopping:
                raise ServiceStopping("the service is shutting down; no model can be swapped in now")
            started = time.perf_counter()
            current = self._active
            try:
                async with asyncio.timeout(self.swap_timeout_s):
                    candidate = await self._stage(Path(checkpoint), origin)
                    await asyncio.shield(self._installed)  # type: ignore[arg-type]
            except TimeoutError:
                self._staged = None  # never installed; the preparation thread's late result is dropped
                raise SwapTimedOut(
                    f"the model at {checkpoint} was not in service within {self.swap_timeout_s:g} s "
                    "(APP_SWAP_TIMEOUT_S); the previous model keeps serving: retry when the service is less "
                    "busy, or raise APP_SWAP_TIMEOUT_S") from None
            logger.info("model swapped in, serving on %s", candidate.backend_reason,
                        extra={"model_version": candidate.card.version, "origin": origin,
                               "backend": candidate.backend,
                               "previous_version": current.card.version if current else None,
                               "seconds": round(time.perf_counter() - started, 3)})
            return candidate.card

    async def _stage(self, checkpoint: Path, origin: str) -> ServedModel:
        """Prepare ``checkpoint`` off the batching loop, and stage it to go in between two batches."""
        try:
            candidate = await asyncio.get_running_loop().run_in_executor(
                self._preparation_thread, self._prepare, checkpoint, origin)
        except (CheckpointError, asyncio.CancelledError):
            raise
        except Exception as error:  # loading, tracing or warming up failed: the old model keeps serving
            logger.exception("the model at %s could not be prepared", checkpoint)
            raise SwapFailed(f"the model at {checkpoint} could not be served ({type(error).__name__}: {error}); "
                             "the previous model keeps serving") from None
        self._staged = candidate
        self._installed = asyncio.get_running_loop().create_future()
        self._install_if_safe()
        self._notify()  # the batching loop installs it when idle, or after the requests already begun
        return candidate

    def _prepare(self, checkpoint: Path, origin: str) -> ServedModel:
        try:
            # Forward passes of the serving model go on meanwhile; only torch.fx's tracing step holds them back.
            served = ServedModel.load(checkpoint, self.device, self.backend_policy, ranking_batch=self.max_batch_size,
                                      origin=origin, tracing=self._preparation_gate.exclusive)
        except OSError as error:  # unreadable files; CheckpointError covers the rest
            raise CheckpointError(f"cannot read the checkpoint at {checkpoint}: {error}") from None
        served.warm_up(sorted({1, self.max_batch_size}))
        return served

    def _install_if_safe(self) -> None:
        if self._staged is None:
            return
        if any(work.taken for work in self._pending):
            return  # a request split over batches is half computed by the old model: finish it first
        self._active, self._staged = self._staged, None
        self._hand_back_other_sizes(self._active.card.input_size)
        if self._observer:
            self._observer.model_installed(self._active)
        if self._installed is not None and not self._installed.done():
            self._installed.set_result(None)

    def _hand_back_other_sizes(self, size: int) -> None:
        """Return the waiting requests fitted to another input size to their callers, none of them computed
        (``_install_if_safe`` never installs while a request is half computed)."""
        for work in [work for work in self._pending if work.size != size]:
            work.queued = False
            self._pending.remove(work)
            self._dequeued(work, len(work.inputs))
            if not work.future.done():
                work.future.set_exception(_other_size(work.size, size))

    # -- requests --------------------------------------------------------------------------------------

    async def predict(self, inputs: Sequence[np.ndarray], *, timeout: float, tag: str | None = None,
                      client: str | None = None) -> ModelOutput:
        """The logits of ``inputs``; ``tag`` names the request in logs, ``client`` who sent it (for
        ``max_client_images``)."""
        if self._stopping:
            raise ServiceStopping("the service is shutting down: retry in a moment (another replica may answer)")
        if self._active is None:
            raise NoModelLoaded(self.unavailable_reason)
        count = len(inputs)
        if count == 0:
            return ModelOutput(np.empty((0, len(self._active.card.class_names)), np.float32), self._active.card)
        size = _side(inputs[0])
        if size != self._active.card.input_size:
            raise _other_size(size, self._active.card.input_size)
        self.check_admission(count, client)
        loop = asyncio.get_running_loop()
        work = _Work(inputs=inputs, size=size, future=loop.create_future(), enqueued_at=time.monotonic(), tag=tag,
                     client=client)
        self._pending.append(work)
        self._queued += count
        self.client_shares.add(client, count)
        self._notify()
        reason = "cancelled"  # unless its deadline passed: its caller went away (a client that disconnected)
        try:
            async with asyncio.timeout(timeout):
                return await work.future
        except TimeoutError:
            reason = "deadline"
            raise DeadlineExceeded(
                f"no prediction within {timeout:.3g} s (APP_REQUEST_TIMEOUT_S): the service is overloaded; "
                "retry later, or send fewer images per request") from None
        finally:
            if work.future.cancelled():
                self._remove(work, reason)

    def check_admission(self, count: int, client: str | None) -> None:
        """Raise ``QueueFull`` unless ``count`` more images fit: in the queue, in the part of it a request of
        several images may take, and in the client's share. Asked again when the images are queued; asking
        first, before decoding, spares the decoding of a request that would be refused."""
        room = self.max_queue - (self.single_image_reserve if count > 1 else 0)
        shares = self.client_shares
        if self._queued + count > room:
            why = (f"the inference queue is full ({self._queued} images waiting, APP_MAX_QUEUE={self.max_queue}"
                   + (f", of which {self.single_image_reserve} are kept for single images, "
                      "APP_SINGLE_IMAGE_RESERVE)" if count > 1 and self.single_image_reserve else ")"))
        elif shares.over_share(client, count):
            why = (f"this client already has {shares.waiting(client)} images waiting, and may have "
                   f"{shares.max_images} (APP_MAX_CLIENT_IMAGES)")
        else:
            return
        if self._observer:
            self._observer.images_dropped(count, "queue_full")
        retry_after = self.retry_after_s()
        if client is not None and shares.over_share(client, count):
            shares.refused(client, retry_after)
        raise QueueFull(f"{why}; retry after {retry_after} s", retry_after)

    def _dequeued(self, work: _Work, count: int) -> None:
        """``count`` of ``work``'s images left the queue (to a forward pass, or dropped)."""
        self._queued -= count
        self.client_shares.remove(work.client, count)

    def forward_pass(self) -> AbstractContextManager[None]:
        """A context for a forward pass run outside the engine (``POST /explain``'s Grad-CAM): it waits while a
        model being prepared is traced, as the engine's own passes do (``_PreparationGate``)."""
        return self._preparation_gate.shared()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from recent forward-pass times; 1 to 60."""
        estimate = self._queued * self._seconds_per_image / self.parallel_batches
        return max(1, min(60, math.ceil(estimate)))

    def _remove(self, work: _Work, reason: str) -> None:
        """Take a request's not-yet-computed images out of the queue."""
        if not work.queued:
            return
        work.queued = False
        self._pending.remove(work)
        left = len(work.inputs) - work.taken
        self._dequeued(work, left)
        if self._observer and left:
            self._observer.images_dropped(left, reason)
        self._install_if_safe()

    def _notify(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # -- the batching loop -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        running: set[asyncio.Future[tuple[np.ndarray, np.ndarray, float]]] = set()
        while (batch := await self._next_batch(running)) is not None:
            model = self._active
            assert model is not None  # predict() queues nothing before the first model is installed
            inputs = [item for work, start, stop in batch for item in work.inputs[start:stop]]
            future = loop.run_in_executor(self._device_threads, self._compute, model, inputs)
            running.add(future)
            future.add_done_callback(running.discard)
            future.add_done_callback(functools.partial(self._deliver, batch, model))
        if running:
            await asyncio.wait(running)

    async def _next_batch(self, running: set[asyncio.Future]) -> list[_Slice] | None:
        """Wait until a batch should go (see the module docstring), then take it from the queue."""
        while True:
            if not self._pending:
                self._install_if_safe()  # idle: a staged model goes in now, not when the next request comes
                if self._stopping:
                    return None
                await self._wait_for_news(set(), None)
                continue
            device_free = len(running) < self.parallel_batches
            waited = time.monotonic() - min(work.enqueued_at for work in self._pending)
            full = self._queued >= self.max_batch_size
            if device_free and (full or waited >= self.max_batch_delay_s or self._stopping):
                self._install_if_safe()
                return self._take(self._batch_room(busy=len(running)))
            if device_free:
                await self._wait_for_news(set(), self.max_batch_delay_s - waited)
            else:
                await self._wait_for_news(running, None)

    async def _wait_for_news(self, running: set[asyncio.Future], timeout: float | None) -> None:
        """Sleep until a request arrives, a forward pass finishes, or ``timeout`` passes."""
        self._wakeup = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._wakeup, *running}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    def _batch_room(self, busy: int) -> int:
        """How many images the next batch takes: the queue up to ``max_batch_size``, shared out among the
        idle device threads. It trades a little batching efficiency for using every device thread:
        closed-loop clients otherwise fall into lockstep, their images queuing together, going as one
        batch to one single-threaded pass while the other threads idle, and coming back together
        (benchmarks/compare.py measured half the throughput at concurrency 8 before this; benchmarks/README.md)."""
        idle = max(1, self.parallel_batches - busy)
        return max(1, min(self.max_batch_size, math.ceil(self._queued / idle)))

    def _take(self, room: int) -> list[_Slice]:
        """Up to ``room`` images, round-robin over the waiting requests (one image each in turn, in queue
        order); a request with images left goes to the back of the queue. While a model is staged, only the
        requests already begun are taken, so none stays half computed and the model goes in."""
        eligible = [work for work in self._pending if work.taken or self._staged is None]
        shares = dict.fromkeys(eligible, 0)
        while room and eligible:
            for work in list(eligible):
                if not room:
                    break
                shares[work] += 1
                room -= 1
                if work.taken + shares[work] == len(work.inputs):
                    eligible.remove(work)
        batch: list[_Slice] = []
        for work, share in shares.items():
            if not share:
                continue
            start = work.taken
            work.taken = start + share
            batch.append((work, start, work.taken))
            self._dequeued(work, share)
            self._pending.remove(work)
            if work.taken < len(work.inputs):
                self._pending.append(work)
            else:
                work.queued = False
        return batch

    def _compute(self, model: ServedModel, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        """On a device thread: the logits and features of ``inputs`` and the seconds the forward pass took."""
        started = time.perf_counter()
        with self._preparation_gate.shared():
            logits, features = self._forward(model, inputs)
        return logits.numpy(), features.numpy(), time.perf_counter() - started

    def _forward(self, model: ServedModel, inputs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return model.outputs(self._stager.to_device(model, inputs))
        except torch.OutOfMemoryError:
            if len(inputs) == 1:
                raise
        # Outside the except block, so the failed attempt's tensors (held by the traceback) are freed first.
        logger.warning("out of memory on a batch of %d images; retrying it in two halves", len(inputs))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self._observer:
            self._observer.batch_split()
        half = len(inputs) // 2
        (first_logits, first_features), (last_logits, last_features) = (
            self._forward(model, inputs[:half]), self._forward(model, inputs[half:]))
        return torch.cat([first_logits, last_logits]), torch.cat([first_features, last_features])

    def _deliver(self, batch: list[_Slice], model: ServedModel, future: asyncio.Future) -> None:
        """On the event loop, when a forward pass ends: hand each request its rows, or its error."""
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        images = sum(stop - start for _, start, stop in batch)
        if error is not None:
            logger.error("inference failed on a batch of %d images", images, exc_info=error,
                         extra={"model_version": model.card.version,
                                "request_ids": sorted({w.tag for w, _, _ in batch if w.tag})})
            for work, _, _ in batch:
                self._remove(work, "failed")
                if not work.future.done():
                    # The exception itself is in the log above, not in the answer: it can name internals.
                    work.future.set_exception(InferenceFailed(
                        f"inference failed on this request's batch of {images} images; the service is still "
                        "serving: retry, and report the X-Request-ID if it recurs"))
            return
        logits, features, seconds = future.result()
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / images
        if self._observer:
            self._observer.batch_computed(images, seconds)
        row = 0
        for work, start, stop in batch:
            rows, feature_rows = logits[row: row + stop - start], features[row: row + stop - start]
            row += stop - start
            if work.future.done():
                continue  # its deadline passed, or its client went away
            if start == 0 and stop == len(work.inputs):
                work.future.set_result(ModelOutput(rows, model.card, feature_rows, model.ood_statistics))
                continue
            if work.logits is None or work.features is None:
                work.logits = np.empty((len(work.inputs), rows.shape[1]), dtype=np.float32)
                work.features = np.empty((len(work.inputs), feature_rows.shape[1]), dtype=np.float32)
            work.logits[start:stop] = rows
            work.features[start:stop] = feature_rows
            work.delivered += stop - start
            if work.delivered == len(work.inputs):
                work.future.set_result(ModelOutput(work.logits, model.card, work.features, model.ood_statistics))


def _side(item: np.ndarray) -> int:
    """The side of an input's square: uint8 pixels are HWC, normalised float tensors CHW."""
    return item.shape[0] if item.dtype == np.uint8 else item.shape[1]


def _other_size(size: int, serving: int) -> InputSizeChanged:
    return InputSizeChanged(f"the model now serving takes {serving}x{serving} inputs, not {size}x{size}: fit "
                            f"the images to {serving}x{serving} and send them again", serving)


# How much nicer than the process the thread that prepares models runs: a swap takes longer, and the serving
# model's passes keep more of the cores meanwhile (benchmarks/swap_under_load.py: back-to-back ONNX swaps at
# the inference threads' priority kept 44 % of the throughput, niced 70 %; benchmarks/README.md).
PREPARATION_NICENESS = 10


def _lower_this_threads_priority() -> None:
    """Linux schedules threads on their own, so one thread's niceness can differ from the process's."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + PREPARATION_NICENESS))
    except (AttributeError, OSError):  # not Linux, or not permitted: preparation runs at normal priority
        pass


class _PreparationGate:
    """Forward passes share the device; tracing a model with torch.fx excludes them.

    int8's ``prepare_fx`` traces the model, and fx's tracer patches ``nn.Module.__call__`` for the whole
    process while it runs: a forward pass on another thread at that moment is routed into the tracer and
    fails ("module is not installed as a submodule"), which once made a hot swap under load fail a batch.
    So that one step (``model.inference``'s ``tracing`` hook, well under a second) waits for running passes
    and holds new ones back; the rest of a swap (reading and hashing the file, folding BatchNorm, which no
    longer traces, calibrating, the ONNX export, warming up) runs alongside them
    (benchmarks/swap_under_load.py measures it).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._passes = 0
        self._preparing = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._preparing)
            self._passes += 1
        try:
            yield
        finally:
            with self._condition:
                self._passes -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._preparing)
            self._preparing = True
            self._condition.wait_for(lambda: self._passes == 0)
        try:
            yield
        finally:
            with self._condition:
                self._preparing = False
                self._condition.notify_all()
