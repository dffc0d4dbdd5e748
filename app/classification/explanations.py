"""``POST /explain``'s pipeline: the classification stages for one upload, with a Grad-CAM heat map of the
class it explains (``model.explain``), computed off the batching path.

The engine's network cannot give one: it is prepared for inference (BatchNorm folded, run under
``torch.inference_mode``, maybe int8 or ONNX Runtime), and keeps no gradients. So each explain thread builds
its own copy of the serving model from the same checkpoint, as trained, in eval mode, and rebuilds it when
another model takes over (``ServedModel.path``; the copy must have the served card's version, so weights
changed on disk since are refused rather than explained). The stages are those of ``Classifier``: decode and
fit (``images.image_pixels``), normalise with the serving model's statistics (``ServedModel.normalise``),
then one pass of the served network (whatever its backend) for stages 6 (``probabilities.assess_logits``)
and 7 (``Prediction.of``), so an explanation's prediction is exactly ``/predict``'s, and one forward and
backward pass of the float32 copy (``grad_cam``) for the map of the explained class.

At most ``concurrency`` maps are computed at once (``APP_EXPLAIN_CONCURRENCY``), each on its own thread; a
request beyond them is refused at once (``ExplainerBusy``, 503) rather than queued, so a burst of
explanations never builds a backlog, and never delays a ``/predict``, whose batches run on the engine's
device threads.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from app.classification.answers import Prediction
from app.classification.images import image_pixels
from app.classification.probabilities import assess_logits
from app.engine.engine import InferenceEngine
from app.engine.errors import (
    ExplainerBusy,
    ExplanationUnavailable,
    NoModelLoaded,
    NonFiniteOutput,
    UnknownClass,
)
from app.engine.served_model import ServedModel
from model.checkpoint import load_checkpoint
from model.explain import grad_cam, grad_cam_layer


@dataclass(frozen=True)
class Explanation:
    prediction: Prediction
    explained_index: int
    explained_label: str
    heatmap_png: bytes  # 8-bit grayscale, the model's input size: 255 at the peak, 0 where nothing counted
    size: int           # its width and height
    layer: str          # the module whose feature map was weighed (model.explain.GRAD_CAM_LAYERS)


class Explainer:
    def __init__(self, engine: InferenceEngine, *, concurrency: int, max_image_pixels: int,
                 calibrated: bool = True) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.max_image_pixels = max_image_pixels
        self.calibrated = calibrated
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="explain")
        self._running = 0  # touched on the event loop only
        self._copies = threading.local()  # each explain thread's own (version, network)

    @property
    def running(self) -> int:
        return self._running

    def check_free(self) -> None:
        """Refuse at once when every slot is taken, before the upload is read."""
        if self._running >= self.concurrency:
            raise ExplainerBusy(
                f"all {self.concurrency} explanation slots are busy (APP_EXPLAIN_CONCURRENCY={self.concurrency}); "
                f"retry in {ExplainerBusy.retry_after_s} s. /predict is not affected")

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.check_free()
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    async def explain(self, upload: bytes, *, class_name: str | None, top_k: int) -> Explanation:
        """The prediction for ``upload`` and the heat map of ``class_name`` (default: the predicted class).
        The caller holds a ``slot()``."""
        served = self.engine.model
        if served is None:
            raise NoModelLoaded(self.engine.unavailable_reason)
        names = served.card.class_names
        if class_name is not None and class_name not in names:
            raise UnknownClass(f"class={class_name!r} is not one of this model's classes: {', '.join(names)}")
        class_index = None if class_name is None else names.index(class_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._explain, served, upload, class_index, top_k)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _explain(self, served: ServedModel, upload: bytes, class_index: int | None, top_k: int) -> Explanation:
        """On an explain thread: every stage, for one image."""
        card = served.card
        pixels = image_pixels(upload, card.input_size, self.max_image_pixels)
        batch = served.normalise(torch.from_numpy(np.array(pixels[None])).to(served.device))  # a writable copy
        # The prediction is the serving backend's (one pass of the served network on this thread, as /predict
        # computes it, int8 included), so an explanation never answers another label or confidence than
        # /predict; the map is of the float32 model as trained, which alone has gradients.
        # Both passes wait while a model being prepared is traced (int8's torch.fx patches every module's call
        # for the whole process meanwhile: a pass then failed with a 500 during a swap).
        with self.engine.forward_pass():
            logits, features = served.outputs(batch)
            output = assess_logits(logits.numpy(), card, calibrated=self.calibrated, features=features.numpy(),
                                   statistics=served.ood_statistics)
        if not np.isfinite(output.probabilities).all():
            raise NonFiniteOutput(f"the model serving ({card.version}) computed NaN or infinite outputs for this "
                                  "image, so there is nothing to explain; serve another model (POST /admin/reload)")
        prediction = Prediction.of(output, 0, min(top_k, len(card.class_names)))
        if class_index is None:
            class_index = card.class_names.index(prediction.label)
        layer = grad_cam_layer(card.architecture)
        network = self._network(served)
        with self.engine.forward_pass():
            result = grad_cam(network, batch, class_index, layer)
        explained = int(result.class_index[0])
        heatmap = np.rint(result.heatmaps[0].cpu().numpy() * 255).astype(np.uint8)
        return Explanation(prediction=prediction, explained_index=explained,
                           explained_label=card.class_names[explained], heatmap_png=_png(heatmap),
                           size=card.input_size, layer=layer)

    def _network(self, served: ServedModel) -> nn.Module:
        """This thread's Grad-CAM copy of the serving model, built from its checkpoint the first time."""
        version, network = getattr(self._copies, "model", (None, None))
        if version == served.card.version and network is not None:
            return network
        if served.path is None:
            raise ExplanationUnavailable("the serving model was not loaded from a checkpoint directory, so it "
                                         "cannot be explained")
        try:
            checkpoint = load_checkpoint(served.path, served.device)
        except (OSError, ValueError) as error:
            raise ExplanationUnavailable(f"cannot load {served.path} again to explain it ({error}); "
                                         "POST /admin/reload to serve a readable checkpoint") from None
        if checkpoint.card.version != served.card.version:
            raise ExplanationUnavailable(
                f"the checkpoint at {served.path} is now {checkpoint.card.version}, not the serving "
                f"{served.card.version}; POST /admin/reload to serve what is on disk")
        network = checkpoint.model.eval().requires_grad_(False)  # grad_cam needs the input's gradient only
        self._copies.model = (served.card.version, network)
        return network


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D uint8: mode L
    return buffer.getvalue()
