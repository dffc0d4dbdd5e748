"""The network's features for the out-of-distribution score, and the statistics that score reads.

Every architecture's ``forward_with_features(x)`` returns its logits (exactly ``forward``'s) and two vectors per
image, which ``joined`` puts side by side as the features: the first stage's output averaged over the image, then
the penultimate vector the final linear layer reads (fastcnn: globally max-pooled; the ResNets: average-pooled).
``LogitsAndFeatures`` wraps a network so that one forward pass gives all three; ``model.inference`` prepares the
wrapper for every backend, and the service reads them.

A feature score (``model.trust``) reads one part of that vector (``part_of``) after a transform
(``transform``): ``log``, ``log(max(v, 0) + 0.1)``, which makes the skewed activations of the first stage
closer to Gaussian, or ``l2``, the vector divided by its length (as in Sun et al. 2022, "Out-of-Distribution
Detection with Deep Nearest Neighbors"), and measures the Mahalanobis distance to the training images' mean
under their covariance (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks"; one Gaussian for all classes, since the first stage knows no class yet).
Its statistics, a mean and a precision matrix, lie in ``model.card.STATISTICS_FILE`` next to the weights, as
safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load, save
from torch import nn

from model.card import FeaturePart, Transform
from model.durable import write_atomically
from model.staged import StagedNetwork

LOG_OFFSET = 0.1


class LogitsAndFeatures(nn.Module):
    """``network`` whose forward returns ``(logits, stage1, penultimate)``; the logits are the network's own.

    The two parts stay separate outputs, joined by ``joined`` after the pass: inside an int8 graph a
    ``torch.cat`` of them is quantized with one scale for both, which rounded the small first-stage averages
    so coarsely that the served int8 model kept 84 % of the test images where float32 kept 94 %."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cast(StagedNetwork, self.network).forward_with_features(batch)  # every architecture is one


def joined(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``LogitsAndFeatures``' outputs as (logits, features): float32, the features' parts side by side."""
    logits, *parts = outputs
    return logits.float(), torch.cat([part.float() for part in parts], 1)


def part_of(features: torch.Tensor, part: FeaturePart, penultimate_width: int) -> torch.Tensor:
    """One part of ``joined``'s features; ``penultimate_width`` is the final layer's input width."""
    return features[:, -penultimate_width:] if part == "penultimate" else features[:, :-penultimate_width]


def transform(values: torch.Tensor, kind: Transform) -> torch.Tensor:
    values = values.float()
    if kind == "log":
        return torch.log(values.clamp_min(0) + LOG_OFFSET)
    if kind == "l2":
        return torch.nn.functional.normalize(values, dim=1)
    return values


@dataclass(frozen=True)
class GaussianStatistics:
    """A mean ``(D,)`` and a precision matrix ``(D, D)``, float32; higher score = nearer the mean."""

    mean: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, values: torch.Tensor, ridge: float = 1e-3) -> GaussianStatistics:
        """Maximum-likelihood mean and covariance of ``values`` (N, D), the covariance's diagonal raised by
        ``ridge`` times its mean so that it always inverts (a few flat features would make it singular)."""
        values = values.double()
        mean = values.mean(0)
        centred = values - mean
        covariance = centred.T @ centred / len(values)
        covariance += ridge * covariance.diagonal().mean() * torch.eye(len(mean), dtype=covariance.dtype)
        return cls(mean.float(), torch.linalg.inv(covariance).float())

    def score(self, values: torch.Tensor) -> torch.Tensor:
        """Minus the squared Mahalanobis distance of each row of ``values`` to the mean."""
        centred = values.float() - self.mean
        return -((centred @ self.precision) * centred).sum(1)

    def to_bytes(self) -> bytes:
        return save({"mean": self.mean.contiguous(), "precision": self.precision.contiguous()},
                    metadata={"kind": "gaussian"})

    @classmethod
    def from_bytes(cls, data: bytes) -> GaussianStatistics:
        tensors = load(data)
        return cls(tensors["mean"], tensors["precision"])

    def write(self, path: Path) -> None:
        write_atomically(path, self.to_bytes())
