"""The shape every architecture of ``model.architectures`` shares: stem, first stage, the rest, head.

Written once so that one forward pass can give the logits and the features the OOD score reads
(``model/features.py``) in the same way for every network, and ``forward`` stays exactly the logits.
"""

from __future__ import annotations

import torch
from torch import nn


class StagedNetwork(nn.Module):
    """Subclasses define ``_stem``, ``layer1``, ``_rest`` (from the first stage's output to the penultimate
    vector) and ``head`` (the penultimate vector to the logits)."""

    layer1: nn.Module

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rest(self, first: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector the head reads."""
        return self._rest(self.layer1(self._stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits, exactly as ``forward`` gives them, and ``model.features``' two parts: the first stage's
        output averaged over the image, and the penultimate vector."""
        first = self.layer1(self._stem(x))
        penultimate = self._rest(first)
        return self.head(penultimate), first.mean((2, 3)), penultimate
