"""One verified checkpoint made ready to serve: on its device, in eval mode, channels_last, warmed up.

``ServedModel.load(path, device, backend)`` verifies the checkpoint (card, SHA-256) through ``model.checkpoint``
and prepares it with ``model.inference`` (on the CPU, ``backend``: BatchNorm folded into the convolutions by
default, see APP_CPU_BACKEND);
``logits(batch)`` maps a normalised float batch to the network's logits, in float32 on the CPU (bf16
autocast on CUDA, where tensor cores make it ~2x faster; float32 on the CPU, where bf16 is emulated on
most cores and slower). Logits, not probabilities: the classification pipeline turns them into calibrated
probabilities and an OOD score (``model.trust``), and the energy score needs the logits themselves.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import ModelCard, load_checkpoint
from model.inference import DEFAULT_CPU_BACKEND, prepare_for_inference


@dataclass(frozen=True, eq=False)
class ServedModel:
    card: ModelCard
    network: nn.Module
    device: torch.device
    mean: torch.Tensor  # (1, 3, 1, 1), float32, on device, on the 0..1 scale
    std: torch.Tensor
    backend: str = "eager"  # model.inference backend; on CUDA always eager
    origin: str = ""        # why this checkpoint is served (the shipped default, APP_WEIGHTS, the registry...)
    path: Path | None = None  # the checkpoint it was loaded from (POST /explain builds its own copy from it)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device, backend: str = DEFAULT_CPU_BACKEND,
             calibration: np.ndarray | None = None, origin: str = "") -> ServedModel:
        """``calibration``: uint8 HWC training images, for the int8 backend only."""
        checkpoint = load_checkpoint(path, device)
        card = checkpoint.card
        shape = (1, 3, 1, 1)
        mean = torch.tensor(card.mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(card.std, dtype=torch.float32, device=device).view(shape)
        normalised = None
        if calibration is not None:
            normalised = (torch.from_numpy(calibration).permute(0, 3, 1, 2).float().div(255.0) - mean) / std
        # oneDNN and cuDNN both run convolutions natively in NHWC; NCHW costs a layout reorder per layer.
        # On the CPU the backend also folds BatchNorm into the convolutions (benchmarks/README.md).
        network = prepare_for_inference(checkpoint.model, device, backend, normalised).requires_grad_(False)
        return cls(card=card, network=network, device=device, mean=mean, std=std,
                   backend=backend if device.type == "cpu" else "eager", origin=origin, path=Path(path))

    @property
    def dtype(self) -> str:
        if self.device.type == "cuda":
            return "bfloat16 (autocast)"
        return {"bf16": "bfloat16", "int8": "int8 (static quantization)"}.get(self.backend, "float32")

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels -> float NCHW normalised with this model's card; the permuted view of an NHWC
        tensor is already channels_last, so no layout copy happens."""
        batch = pixels.permute(0, 3, 1, 2).float()
        return batch.div_(255.0).sub_(self.mean).div_(self.std)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes), float32, on the CPU."""
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = self.network(batch.contiguous(memory_format=torch.channels_last))
            return logits.float().cpu()

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
