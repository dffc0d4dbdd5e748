"""The BentoML peer: BentoML's adaptive batching (``batchable=True``, ``max_batch_size``,
``max_latency_ms``) around the same model, decoding and answer as the service (``common.py``).

    PEER_WEIGHTS=weights/resnet50 BENTOML_DO_NOT_TRACK=true \\
        .venv-bench/bin/bentoml serve benchmarks.peers.bentoml_service:CifarFront --host 127.0.0.1 --port 8003

A batchable API merges the *lists* that separate requests send and answers each with a list, so it cannot
take one uploaded file and answer our JSON object directly. The usual BentoML layout fills the gap: a thin
front service takes the multipart upload (field ``file``, as our /predict), decodes it and calls the
batchable model service, which BentoML runs in its own ``PEER_WORKERS`` process(es) and batches adaptively.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np

from app.classification.answers import Prediction
from benchmarks.peers.common import MAX_IMAGE_PIXELS, TOP_K, Classifier, PeerSettings
from model.card import read_card

SETTINGS = PeerSettings.from_environment()
# No access log: every server in the comparison runs without one (ours and LitServe at log level warning,
# the plain FastAPI app with uvicorn's access_log=False), since a log line per request costs CPU.
QUIET = {"logging": {"access": {"enabled": False}}}


@bentoml.service(workers=SETTINGS.workers, traffic={"timeout": 60}, **QUIET)
class CifarModel:
    def __init__(self) -> None:
        self.classifier = Classifier(SETTINGS)

    # max_latency_ms is BentoML's latency budget, not a batch window: the dispatcher adapts its window
    # below it, and refuses (503) a request it expects to miss it (common.py, PEER_MAX_LATENCY_MS).
    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        return self.classifier.probabilities(pixels)


@bentoml.service(workers=1, traffic={"timeout": 60}, **QUIET)
class CifarFront:
    model = bentoml.depends(CifarModel)

    def __init__(self) -> None:
        from app.classification.images import image_pixels

        self.card = read_card(SETTINGS.weights)
        self.decode = lambda data: image_pixels(data, self.card.input_size, MAX_IMAGE_PIXELS)

    @bentoml.api(route="/predict")
    async def predict(self, file: Path) -> dict:
        pixels = self.decode(file.read_bytes())
        probabilities = await self.model.to_async.classify(pixels[np.newaxis])
        return Prediction.from_probabilities(probabilities[0], self.card, TOP_K).model_dump(mode="json")
