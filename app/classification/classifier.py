"""The classification pipeline: ``Classifier`` is the one path from a request's bytes to its answer, and every
endpoint that classifies calls it (``/predict``, ``/predict/batch``, the KServe v2 ``infer``, ``/explain``);
none of them runs a stage itself.

The stages, in order, and where each one runs:

====  ==============  ==========================================================  ================
 1    decode          bytes -> upright RGB image (``images.decode_image``)        decode threads
 2    fit             image -> the model's input size, uint8 HWC                  decode threads
                      (centre crop + antialiased resize, ``images.fit_to_size``)
 3    normalise       pixels -> float, the model's mean and std                   device thread
                      (``ServedModel.normalise``)
 4    batch           with the images of other requests (``InferenceEngine``)     event loop
 5    forward         the network: logits (``ServedModel.logits``)               device thread
 6    probabilities   calibrated softmax and the OOD score and flag, with the     event loop
                      card of the model that computed the rows
                      (``probabilities.assess_logits``, ``model.trust``)
 7    response        one ``Prediction`` per image (``Prediction.of``)            event loop
====  ==============  ==========================================================  ================

The engine owns the input size: stage 2 fits to the size of the model serving when the request arrives,
and when a model of another input size is swapped in while the request waits, the engine hands the request
back before computing any of it (``InputSizeChanged``); stage 2 then runs again, from the bytes, for the new
size. Stage 6 applies the card's temperature when ``calibrated`` (``APP_CALIBRATION=on``, the default).
The v2 protocol sends tensors, not files: its own decode stage parses them (``classify_tensors``), and it
encodes its own response; the stages in between are these.

Two checks guard the stages: images waiting for a decode thread are bounded (``max_decode_queue``, past it
``DecodeQueueFull``, a 503), and an answer made of non-finite logits or probabilities (a model whose weights
diverged to NaN) is never served: ``NonFiniteOutput``, a 500 that says so, for every endpoint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image

from app.classification.answers import Prediction
from app.classification.images import image_pixels
from app.classification.probabilities import AssessedOutput, assess_logits
from app.engine.engine import InferenceEngine, ModelOutput
from app.engine.errors import DecodeQueueFull, ImageError, InputSizeChanged, NonFiniteOutput
from app.logging import request_id

logger = logging.getLogger(__name__)

# A request is fitted again when a model of another input size takes over while it waits; two swaps of
# input size within one request's deadline are already unusual, so the third attempt is the last.
FIT_ATTEMPTS = 3


class TensorRequest(Protocol):
    """What a protocol's own decode stage (v2's JSON tensors) yields: one input per image."""

    @property
    def inputs(self) -> Sequence[np.ndarray]: ...


ParsedRequest = TypeVar("ParsedRequest", bound=TensorRequest)
T = TypeVar("T")


class Classifier:
    def __init__(self, engine: InferenceEngine, *, decode_threads: int, max_image_pixels: int,
                 calibrated: bool = True, max_decode_queue: int = 256) -> None:
        self.engine = engine
        self.max_decode_queue = max_decode_queue
        self._decoding = 0  # images handed to the decode threads and not yet decoded
        self.max_image_pixels = max_image_pixels
        self.calibrated = calibrated
        # Pillow releases the GIL while it decodes, so these threads decode in parallel.
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        # Pillow's warning for images between its limits is noise: the header check in decode_image decides.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    async def classify(self, uploads: Sequence[bytes], *, deadline: float, top_k: int,
                       client: str | None = None) -> list[Prediction]:
        """The answers for uploaded image files, in upload order; ``deadline`` is a ``time.monotonic()``,
        ``client`` who sent them (the engine's per-client limit)."""
        self.engine.check_admission(len(uploads), client)  # before any decoding is spent on a refusal
        result = await self._predict(lambda size: self._decode_and_fit(uploads, size), deadline, client)
        return self.respond(result, top_k)

    async def classify_tensors(self, decode: Callable[[int], ParsedRequest], *,
                               deadline: float) -> tuple[ParsedRequest, AssessedOutput]:
        """For a protocol that sends tensors: ``decode(input_size)`` (run on the decode threads) parses the
        request into inputs of that size; the stages from normalise to probabilities follow."""
        parsed: ParsedRequest | None = None

        async def inputs(size: int) -> Sequence[np.ndarray]:
            nonlocal parsed
            (result,) = await self._decode([lambda: decode(size)])
            if isinstance(result, BaseException):
                raise result
            parsed = result
            return result.inputs

        result = await self._predict(inputs, deadline)
        assert parsed is not None
        return parsed, result

    @staticmethod
    def respond(result: AssessedOutput, top_k: int) -> list[Prediction]:
        """Stage 7: one answer per row, naming the model that computed it."""
        k = min(top_k, len(result.card.class_names))
        return [Prediction.of(result, row, k) for row in range(len(result))]

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def _predict(self, inputs_for: Callable[[int], Awaitable[Sequence[np.ndarray]]],
                       deadline: float, client: str | None = None) -> AssessedOutput:
        """Stages 1-2 for the serving model's input size (read first, so a request that must fail for want
        of a model costs no decoding), then 3-5 in the engine, again if the input size changed meanwhile;
        then 6."""
        for _ in range(FIT_ATTEMPTS - 1):
            try:
                output = await self._fit_and_predict(inputs_for, deadline, client)
                break
            except InputSizeChanged:
                pass  # a model of another input size took over while the request waited: fit again
        else:
            output = await self._fit_and_predict(inputs_for, deadline, client)
        assessed = assess_logits(output.logits, output.card, calibrated=self.calibrated, features=output.features,
                                 statistics=output.ood_statistics)
        if not (np.isfinite(output.logits).all() and np.isfinite(assessed.probabilities).all()):
            logger.error("model %s computed non-finite outputs; the request is refused", output.card.version,
                         extra={"model_version": output.card.version})
            raise NonFiniteOutput(f"the model serving ({output.card.version}) computed NaN or infinite outputs "
                                  "for this request, so there is no answer to give; its weights are broken: "
                                  "serve another model (POST /admin/reload), and report the X-Request-ID")
        return assessed

    async def _fit_and_predict(self, inputs_for: Callable[[int], Awaitable[Sequence[np.ndarray]]],
                               deadline: float, client: str | None) -> ModelOutput:
        inputs = await inputs_for(self.engine.input_size)
        return await self.engine.predict(inputs, timeout=deadline - time.monotonic(), tag=request_id.get(),
                                         client=client)

    async def _decode(self, jobs: Sequence[Callable[[], T]]) -> list[T | BaseException]:
        """Run ``jobs`` on the decode threads, refused at once (``DecodeQueueFull``) when more than
        ``max_decode_queue`` would wait; a job not yet begun when its request is cancelled never runs."""
        if self._decoding + len(jobs) > self.max_decode_queue:
            raise DecodeQueueFull(f"{self._decoding} images are waiting to be decoded, and "
                                  f"{self.max_decode_queue} may (APP_MAX_DECODE_QUEUE); retry in a moment", 1)
        self._decoding += len(jobs)
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decoders, job) for job in jobs]
        for future in futures:
            future.add_done_callback(self._decoded)
        results = await asyncio.gather(*futures, return_exceptions=True)
        return results

    def _decoded(self, _: asyncio.Future) -> None:
        self._decoding -= 1

    async def _decode_and_fit(self, uploads: Sequence[bytes], size: int) -> list[np.ndarray]:
        """Stages 1 and 2 of every upload at once; the first failure names which file it was (1-based)."""
        results = await self._decode([functools.partial(image_pixels, data, size, self.max_image_pixels)
                                      for data in uploads])
        for number, result in enumerate(results, start=1):
            if isinstance(result, ImageError):
                raise type(result)(_which(number, len(uploads)) + str(result))
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]


def _which(number: int, total: int) -> str:
    return f"file {number} of {total}: " if total > 1 else ""
