"""The int8 backend's calibration set, saved next to a checkpoint: ``calibration.safetensors``.

Static int8 quantization fixes each activation's range from what the network computes on a few hundred
images (``model.inference.quantize_int8``). They are CIFAR-10 *training* images, never test images, so
that a test accuracy measured with int8 afterwards stays honest. ``python -m training.verify_backends``
(and a training run's end) writes them with the backend report that measured int8 on them, so a service
calibrates on exactly those images without a dataset at hand.

The file holds one tensor, ``pixels``: uint8, ``(N, H, W, 3)`` RGB, as the service's decoder produces
them; normalising with the model card's mean and std is the reader's job. Its metadata binds it to the
weights it was written for.

Beside it, ``verification.safetensors`` is the checkpoint's labelled *verification set*: the holdout images
its temperature was fitted on (training images it never trained on), ``pixels`` as above and ``labels``
(int64 class indices). The service measures its backends on them on the machine it runs on
(``app.engine.self_verification``), so it needs neither a dataset nor the test set to choose a fast backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from model.card import CALIBRATION_FILE, VERIFICATION_FILE
from model.durable import write_atomically

FORMAT_VERSION = "1"
_TENSOR = "pixels"
_LABELS = "labels"


class CalibrationSetError(ValueError):
    """A calibration set that is missing, unreadable or written for other weights; the message says what to do."""


def save_calibration_set(directory: str | os.PathLike[str], pixels: np.ndarray | torch.Tensor, *,
                         weights_sha256: str, source: str) -> Path:
    """Write ``pixels`` (uint8, N x H x W x 3) as ``directory/calibration.safetensors``, atomically."""
    tensor = torch.as_tensor(pixels)
    _check_pixels(tensor, "pixels to save")
    path = Path(directory) / CALIBRATION_FILE
    write_atomically(path, save({_TENSOR: tensor.contiguous()}, metadata={
        "format_version": FORMAT_VERSION, "weights_sha256": weights_sha256, "source": source}))
    return path


def load_calibration_set(directory: str | os.PathLike[str], weights_sha256: str) -> np.ndarray:
    """The uint8 ``(N, H, W, 3)`` pixels saved for the weights with SHA-256 ``weights_sha256``."""
    regenerate = (f"write it with `python -m training.verify_backends --weights {Path(directory)} --data-dir "
                  "DATA`, or use a backend other than int8")
    return _load(Path(directory) / CALIBRATION_FILE, weights_sha256, regenerate, "calibration set")[_TENSOR].numpy()


def save_verification_set(directory: str | os.PathLike[str], pixels: np.ndarray | torch.Tensor,
                          labels: np.ndarray | torch.Tensor, *, weights_sha256: str, source: str) -> Path:
    """Write labelled images (uint8 N x H x W x 3, and N class indices) as ``directory/verification.safetensors``."""
    tensor, classes = torch.as_tensor(pixels), torch.as_tensor(labels).to(torch.int64)
    _check_pixels(tensor, "pixels to save")
    if classes.shape != (len(tensor),):
        raise CalibrationSetError(f"expected one label per image ({len(tensor)}), got shape {tuple(classes.shape)}")
    path = Path(directory) / VERIFICATION_FILE
    write_atomically(path, save({_TENSOR: tensor.contiguous(), _LABELS: classes.contiguous()}, metadata={
        "format_version": FORMAT_VERSION, "weights_sha256": weights_sha256, "source": source}))
    return path


def load_verification_set(directory: str | os.PathLike[str], weights_sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 ``(N, H, W, 3)`` pixels and ``(N,)`` int64 labels saved for the weights ``weights_sha256``."""
    regenerate = f"write it with `python -m training.verify_backends --weights {Path(directory)} --data-dir DATA`"
    tensors = _load(Path(directory) / VERIFICATION_FILE, weights_sha256, regenerate, "verification set", _LABELS)
    pixels, labels = tensors[_TENSOR], tensors[_LABELS]
    if labels.dtype != torch.int64 or labels.shape != (len(pixels),):
        raise CalibrationSetError(f"{Path(directory) / VERIFICATION_FILE}: expected {len(pixels)} int64 labels, got "
                                  f"{labels.dtype} {tuple(labels.shape)}: {regenerate}")
    return pixels.numpy(), labels.numpy()


def _load(path: Path, weights_sha256: str, regenerate: str, what: str, *extra: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CalibrationSetError(f"no {what} at {path}: {regenerate}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            missing = [name for name in (_TENSOR, *extra) if name not in handle.keys()]
            if missing:
                raise CalibrationSetError(f"{path} holds no '{missing[0]}' tensor: {regenerate}")
            tensors = {name: handle.get_tensor(name) for name in (_TENSOR, *extra)}
    except (SafetensorError, OSError) as error:
        raise CalibrationSetError(f"{path} is not a readable safetensors file ({error}): {regenerate}") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CalibrationSetError(f"{path} has format version {metadata.get('format_version')!r}, this code "
                                  f"reads {FORMAT_VERSION!r}: {regenerate}")
    if metadata.get("weights_sha256") != weights_sha256:
        raise CalibrationSetError(f"{path} was written for weights {metadata.get('weights_sha256')}, not for "
                                  f"these ({weights_sha256}): {regenerate}")
    _check_pixels(tensors[_TENSOR], str(path))
    return tensors


def _check_pixels(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[-1] != 3 or len(tensor) == 0:
        raise CalibrationSetError(f"{what}: expected uint8 images N x H x W x 3 with N >= 1, got "
                                  f"{tensor.dtype} {tuple(tensor.shape)}")
