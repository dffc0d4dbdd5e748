"""One verified checkpoint made ready to serve: on its device, in eval mode, channels_last, warmed up.

``ServedModel.load(path, device, policy)`` verifies the checkpoint (card, SHA-256) through ``model.checkpoint``,
decides its backend (``app.engine.backend_choice``: by default the fastest one its backend report verified,
else the exact one) and prepares it with ``model.inference``; ``logits(batch)`` maps a normalised float batch
to the network's logits, in float32 on the CPU (on CUDA the ``fp32`` or ``bf16`` autocast precision, the
latter ~2x faster on tensor cores). Logits, not probabilities: the classification pipeline turns them into
calibrated probabilities and an OOD score (``model.trust``), and the energy score needs the logits themselves.
Every backend's network returns the features of the same pass too (``model.features``), which ``outputs``
gives with the logits: a card whose OOD rule reads them needs them, and they cost no second pass.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.engine.backend_choice import AUTO, DEFAULT_POLICY, BackendPlan, BackendPolicy, plan_backend
from model.backend_report import DEFAULT_RANKING_BATCH, EXACT_BACKEND
from model.card import ModelCard
from model.checkpoint import load_checkpoint
from model.features import GaussianStatistics, joined
from model.inference import prepare_for_inference

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ServedModel:
    card: ModelCard
    network: nn.Module
    device: torch.device
    mean: torch.Tensor  # (1, 3, 1, 1), float32, on device, on the 0..1 scale
    std: torch.Tensor
    backend: str = "fused"  # a model.inference backend on the CPU; fp32 or bf16 (autocast) on CUDA
    backend_reason: str = ""  # why this backend serves (app.engine.backend_choice)
    verified_accuracy: float | None = None  # this backend's test accuracy by the checkpoint's backend report
    origin: str = ""        # why this checkpoint is served (the shipped default, APP_WEIGHTS, the registry...)
    path: Path | None = None  # the checkpoint it was loaded from (POST /explain builds its own copy from it)
    ood_statistics: GaussianStatistics | None = None  # what the card's feature OOD rule reads; None for logits

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device, policy: BackendPolicy = DEFAULT_POLICY,
             *, ranking_batch: int = DEFAULT_RANKING_BATCH, origin: str = "",
             tracing: Callable[[], AbstractContextManager] = nullcontext) -> ServedModel:
        """``ranking_batch``: the batch size backends are compared at (the engine's largest). ``tracing`` is
        entered around the one step that must not run alongside forward passes (``model.inference``)."""
        checkpoint = load_checkpoint(path, device)
        card = checkpoint.card
        plan = plan_backend(policy, Path(path), card.weights_sha256, device, ranking_batch=ranking_batch)
        shape = (1, 3, 1, 1)
        mean = torch.tensor(card.mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(card.std, dtype=torch.float32, device=device).view(shape)
        normalised = None
        if plan.calibration is not None:
            pixels = torch.from_numpy(plan.calibration).to(device)
            normalised = (pixels.permute(0, 3, 1, 2).float().div(255.0) - mean) / std
        # oneDNN and cuDNN both run convolutions natively in NHWC; NCHW costs a layout reorder per layer.
        # On the CPU the backend also folds BatchNorm into the convolutions (benchmarks/README.md); on CUDA
        # the precision is the engine's own autocast, over the model as trained.
        backend = "eager" if device.type == "cuda" else plan.backend
        try:
            network = prepare_for_inference(checkpoint.model, device, backend, normalised, tracing=tracing,
                                            with_features=True)
        except Exception as error:
            exact = EXACT_BACKEND["cpu"]
            if device.type == "cuda" or policy.cpu_backend != AUTO or backend == exact:
                raise  # an explicit choice that cannot run is the operator's to fix: the swap fails, saying why
            # auto's choice is an optimisation: one that cannot be prepared here must not cost the model.
            plan = BackendPlan(exact, f"{exact}, the exact float32 backend: auto chose {backend}, which failed to "
                                      f"prepare ({type(error).__name__}: {error})")
            logger.warning(plan.reason, exc_info=True)
            network = prepare_for_inference(checkpoint.model, device, exact, with_features=True)
        network.requires_grad_(False)
        return cls(card=card, network=network, device=device, mean=mean, std=std, backend=plan.backend,
                   backend_reason=plan.reason, verified_accuracy=plan.verified_accuracy, origin=origin,
                   path=Path(path), ood_statistics=checkpoint.ood_statistics)

    @property
    def dtype(self) -> str:
        if self.device.type == "cuda":
            return "bfloat16 (autocast)" if self.backend == "bf16" else "float32"
        return {"bf16": "bfloat16", "int8": "int8 (static quantization)"}.get(self.backend, "float32")

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels -> float NCHW normalised with this model's card; the permuted view of an NHWC
        tensor is already channels_last, so no layout copy happens."""
        batch = pixels.permute(0, 3, 1, 2).float()
        return batch.div_(255.0).sub_(self.mean).div_(self.std)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes), float32, on the CPU."""
        return self.outputs(batch)[0]

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, classes) and features (N, D) of one forward pass, float32, on the CPU."""
        autocast = self.device.type == "cuda" and self.backend == "bf16"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits, features = joined(self.network(batch.contiguous(memory_format=torch.channels_last)))
            return logits.cpu(), features.cpu()

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run each batch size once, so the first real requests do not pay for kernel selection and
        allocator growth."""
        size = self.card.input_size
        for count in batch_sizes:
            pixels = torch.zeros((count, size, size, 3), dtype=torch.uint8, device=self.device)
            self.logits(self.normalise(pixels))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class BatchStager:
    """Copies a batch's inputs into reusable host buffers (pinned on CUDA) and onto the device.

    Inputs are uint8 HWC pixels (normalised here, with the computing model's statistics) or float32 CHW
    tensors that the client already normalised (the v2 FP32 input). Each device thread has its own buffers.
    """

    def __init__(self, device: torch.device, max_batch: int) -> None:
        self.device = device
        self.max_batch = max_batch
        self._local = threading.local()

    def to_device(self, model: ServedModel, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        size = model.card.input_size
        pixel_rows = [row for row, item in enumerate(inputs) if item.dtype == np.uint8]
        if len(pixel_rows) == len(inputs):
            return model.normalise(self._copy(inputs, (size, size, 3), torch.uint8))
        batch = torch.empty((len(inputs), 3, size, size), device=self.device).contiguous(
            memory_format=torch.channels_last)
        float_rows = [row for row, item in enumerate(inputs) if item.dtype != np.uint8]
        if pixel_rows:
            pixels = self._copy([inputs[row] for row in pixel_rows], (size, size, 3), torch.uint8)
            batch[pixel_rows] = model.normalise(pixels)
        batch[float_rows] = self._copy([inputs[row] for row in float_rows], (3, size, size), torch.float32)
        return batch

    def _copy(self, items: Sequence[np.ndarray], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffer(shape, dtype)[: len(items)]
        np.stack(items, out=buffer.numpy())
        # From pinned memory the copy is asynchronous; the buffer is reused only after this thread's
        # previous batch has been synchronised by its .cpu() result copy.
        return buffer.to(self.device, non_blocking=True)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (shape, dtype)
        if key not in buffers:
            buffers[key] = torch.empty((self.max_batch, *shape), dtype=dtype,
                                       pin_memory=self.device.type == "cuda")
        return buffers[key]
