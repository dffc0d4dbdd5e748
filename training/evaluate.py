"""Accuracy on a labelled image set, plain and with horizontal-flip test-time augmentation (TTA).

Everything is derived from confusion matrices, which are integer counts: shards evaluated on different GPUs
add up exactly, and per-class accuracy comes for free.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from model.labels import CLASS_NAMES, NUM_CLASSES
from training.augment import normalize
from training.data import ImageSet

EVAL_BATCH = 1024


@dataclass(frozen=True)
class Evaluation:
    confusion: torch.Tensor             # int64, true class x predicted class, on the CPU
    confusion_tta: torch.Tensor | None  # the same with flip-TTA, or None when TTA is off

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return _accuracy(self.confusion)

    @property
    def accuracy_tta(self) -> float | None:
        return None if self.confusion_tta is None else _accuracy(self.confusion_tta)

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        """Recall of each class, plain (no TTA), keyed by the class names the model card uses."""
        per_class = self.confusion.diagonal() / self.confusion.sum(1).clamp(min=1)
        return {name: round(float(value), 6) for name, value in zip(CLASS_NAMES, per_class)}


def _accuracy(confusion: torch.Tensor) -> float:
    return round(float(confusion.diagonal().sum() / confusion.sum().clamp(min=1)), 6)


def _confusion(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    # bincount without weights is deterministic on CUDA too, so --deterministic can use it.
    return torch.bincount(labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES**2).view(NUM_CLASSES, -1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    tta: bool,
    autocast: Callable[[], AbstractContextManager],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts,
) -> Evaluation:
    """Evaluate ``model`` on ``data`` (this process's shard of it under torchrun; ``all_reduce_sum`` adds
    the shards' counts). The model is put in eval mode and left there."""
    model.eval()
    device = data.images.device
    plain = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    flipped = torch.zeros_like(plain)
    for start in range(0, len(data), EVAL_BATCH):
        images = normalize(data.images[start:start + EVAL_BATCH])
        labels = data.labels[start:start + EVAL_BATCH]
        with autocast():
            logits = model(images).float()
            plain += _confusion(labels, logits.argmax(1))
            if tta:
                # Averaging the logits of the image and its mirror: the cheapest TTA, worth a few tenths of
                # a point on CIFAR-10 because training saw both orientations.
                both = logits + model(images.flip(3)).float()
                flipped += _confusion(labels, both.argmax(1))
    plain, flipped = all_reduce_sum(plain).cpu(), all_reduce_sum(flipped).cpu()
    return Evaluation(confusion=plain, confusion_tta=flipped if tta else None)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """Predicted classes for a small uint8 batch (the prediction grid), on the CPU."""
    model.eval()
    with autocast():
        return model(normalize(images)).argmax(1).cpu()


@torch.inference_mode()
def logits_of(model: nn.Module, images: torch.Tensor, device: torch.device,
              autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """float32 logits, on the CPU, of uint8 images (on any device), computed on ``device`` in batches."""
    model.eval()
    batches = []
    for start in range(0, len(images), EVAL_BATCH):
        batch = normalize(images[start:start + EVAL_BATCH].to(device))
        with autocast():
            batches.append(model(batch).float().cpu())
    return torch.cat(batches) if batches else torch.empty(0, NUM_CLASSES)
