"""What every peer server shares with ours, so that ``benchmarks/compare.py`` measures serving, not the model.

The same checkpoint, loaded and prepared by the service's own ``ServedModel`` with the same CPU inference
backend (``model.inference``); the same image decoding (``app.classification.images.image_pixels``); the
same JSON answer (``app.classification.answers.Prediction``, top 3). Only the HTTP layer and the batching differ.

Each peer reads its settings from the environment, so compare.py can start it with each knob setting:

    PEER_WEIGHTS            checkpoint directory (required)
    PEER_PORT               TCP port on 127.0.0.1 (default 8000)
    PEER_CPU_BACKEND        model.inference backend, or auto as the service (default fused)
    PEER_WORKERS            model processes (default 1)
    PEER_TORCH_THREADS      intra-op threads per model process (default: cores // workers)
    PEER_MAX_BATCH_SIZE     most images per forward pass (batching peers; default 32)
    PEER_BATCH_TIMEOUT_MS   longest wait for a batch to fill (LitServe; default 5)
    PEER_MAX_LATENCY_MS     BentoML's latency budget per request (default 10000: BentoML refuses, with 503, a
                            request it expects to miss the budget, so a tight one turns load into errors)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.classification.answers import Prediction
from app.classification.images import image_pixels
from app.classification.probabilities import assess_logits
from app.engine.backend_choice import BackendPolicy
from app.engine.served_model import ServedModel
from model.inference import DEFAULT_CPU_BACKEND

MAX_IMAGE_PIXELS = 40_000_000  # the service's default APP_MAX_IMAGE_PIXELS
TOP_K = 3  # the service's default top_k


@dataclass(frozen=True)
class PeerSettings:
    weights: Path
    port: int
    backend: str
    workers: int
    torch_threads: int
    max_batch_size: int
    batch_timeout_ms: float
    max_latency_ms: int

    @classmethod
    def from_environment(cls) -> PeerSettings:
        if "PEER_WEIGHTS" not in os.environ:
            raise SystemExit("set PEER_WEIGHTS to a checkpoint directory (model.safetensors + card.json)")
        workers = int(os.environ.get("PEER_WORKERS", "1"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(
            weights=Path(os.environ["PEER_WEIGHTS"]),
            port=int(os.environ.get("PEER_PORT", "8000")),
            backend=os.environ.get("PEER_CPU_BACKEND", DEFAULT_CPU_BACKEND),
            workers=workers,
            torch_threads=int(os.environ.get("PEER_TORCH_THREADS", "0")) or max(1, cores // workers),
            max_batch_size=int(os.environ.get("PEER_MAX_BATCH_SIZE", "32")),
            batch_timeout_ms=float(os.environ.get("PEER_BATCH_TIMEOUT_MS", "5")),
            max_latency_ms=int(os.environ.get("PEER_MAX_LATENCY_MS", "10000")),
        )


class Classifier:
    """The model of one worker process: decode, classify a batch, build the answer."""

    def __init__(self, settings: PeerSettings) -> None:
        torch.set_num_threads(settings.torch_threads)
        policy = BackendPolicy(cpu_backend=settings.backend)
        self.model = ServedModel.load(settings.weights, torch.device("cpu"), policy)
        self.model.warm_up(sorted({1, settings.max_batch_size}))
        self.input_size = self.model.card.input_size

    def decode(self, data: bytes) -> np.ndarray:
        return image_pixels(data, self.input_size, MAX_IMAGE_PIXELS)

    def probabilities(self, pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """(N, classes) float32 probabilities of N uint8 HWC images, calibrated as the service's default."""
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(pixels) if isinstance(pixels, list) else pixels))
        logits, features = self.model.outputs(self.model.normalise(batch))
        return assess_logits(logits.numpy(), self.model.card, calibrated=True, features=features.numpy(),
                             statistics=self.model.ood_statistics).probabilities

    def answer(self, probabilities: np.ndarray) -> dict:
        return Prediction.from_probabilities(probabilities, self.model.card, TOP_K).model_dump(mode="json")
