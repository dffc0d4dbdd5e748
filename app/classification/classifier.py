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
"""

from __future__ import annotations

import asyncio
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
from app.engine.errors import ImageError, InputSizeChanged
from app.logging import request_id

# A request is fitted again when a model of another input size takes over while it waits; two swaps of
# input size within one request's deadline are already unusual, so the third attempt is the last.
FIT_ATTEMPTS = 3


class TensorRequest(Protocol):
    """What a protocol's own decode stage (v2's JSON tensors) yields: one input per image."""

    @property
    def inputs(self) -> Sequence[np.ndarray]: ...


ParsedRequest = TypeVar("ParsedRequest", bound=TensorRequest)


class Classifier:
    def __init__(self, engine: InferenceEngine, *, decode_threads: int, max_image_pixels: int,
                 calibrated: bool = True) -> None:
        self.engine = engine
        self.max_image_pixels = max_image_pixels
        self.calibrated = calibrated
        # Pillow releases the GIL while it decodes, so these threads decode in parallel.
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        # Pillow's warning for images between its limits is noise: the header check in decode_image decides.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    async def classify(self, uploads: Sequence[bytes], *, deadline: float, top_k: int) -> list[Prediction]:
        """The answers for uploaded image files, in upload order; ``deadline`` is a ``time.monotonic()``."""
        result = await self._predict(lambda size: self._decode_and_fit(uploads, size), deadline)
        return self.respond(result, top_k)

    async def classify_tensors(self, decode: Callable[[int], ParsedRequest], *,
                               deadline: float) -> tuple[ParsedRequest, AssessedOutput]:
        """For a protocol that sends tensors: ``decode(input_size)`` (run on the decode threads) parses the
        request into inputs of that size; the stages from normalise to probabilities follow."""
        parsed: ParsedRequest | None = None

        async def inputs(size: int) -> Sequence[np.ndarray]:
            nonlocal parsed
            parsed = await asyncio.get_running_loop().run_in_executor(self._decoders, decode, size)
            return parsed.inputs

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
                       deadline: float) -> AssessedOutput:
        """Stages 1-2 for the serving model's input size (read first, so a request that must fail for want
        of a model costs no decoding), then 3-5 in the engine, again if the input size changed meanwhile;
        then 6."""
        for _ in range(FIT_ATTEMPTS - 1):
            try:
                output = await self._fit_and_predict(inputs_for, deadline)
                break
            except InputSizeChanged:
                pass  # a model of another input size took over while the request waited: fit again
        else:
            output = await self._fit_and_predict(inputs_for, deadline)
        return assess_logits(output.logits, output.card, calibrated=self.calibrated)

    async def _fit_and_predict(self, inputs_for: Callable[[int], Awaitable[Sequence[np.ndarray]]],
                               deadline: float) -> ModelOutput:
        inputs = await inputs_for(self.engine.input_size)
        return await self.engine.predict(inputs, timeout=deadline - time.monotonic(), tag=request_id.get())

    async def _decode_and_fit(self, uploads: Sequence[bytes], size: int) -> list[np.ndarray]:
        """Stages 1 and 2 of every upload at once; the first failure names which file it was (1-based)."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decoders, image_pixels, data, size, self.max_image_pixels)
                   for data in uploads]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for number, result in enumerate(results, start=1):
            if isinstance(result, ImageError):
                raise type(result)(_which(number, len(uploads)) + str(result))
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]


def _which(number: int, total: int) -> str:
    return f"file {number} of {total}: " if total > 1 else ""
