"""Calibration measures and the temperature fit (Guo et al. 2017, "On Calibration of Modern Neural Networks").

- ``expected_calibration_error``: the confidence (largest probability) of each image falls into one of 15
  equal-width bins ``((m-1)/15, m/15]``; ECE is the image-weighted mean over bins of
  ``|accuracy - mean confidence|`` (Guo et al., eq. 3; their Table 1 uses 15 bins).
- ``negative_log_likelihood``: the mean of ``-log softmax(logits / T)[label]``, in nats.
- ``fit_temperature``: the ``T`` that minimises that NLL on the given (holdout) logits. With ``b = 1/T`` the
  NLL is convex in ``b`` (a log-sum-exp of linear functions minus a linear one), so its derivative
  ``mean(E_softmax[z] - z_label)`` rises monotonically and its one root is found by bisection: exact,
  deterministic, and no step size to tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ECE_BINS = 15
# The fitted temperature is searched in [1/100, 100]; a fit at a bound means the logits say nothing useful.
TEMPERATURE_RANGE = (0.01, 100.0)
_BISECTION_STEPS = 80


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: image count, mean confidence and accuracy (NaN where a bin is empty)."""

    edges: torch.Tensor       # bins + 1 edges, 0 .. 1
    counts: torch.Tensor      # int64
    confidence: torch.Tensor  # float64
    accuracy: torch.Tensor    # float64

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        weights = self.counts[filled].double() / self.counts.sum()
        return float((weights * (self.accuracy[filled] - self.confidence[filled]).abs()).sum())


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> ReliabilityBins:
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels).double()
    # Right-closed bins ((m-1)/M, m/M]: ceil(c * M) - 1, so a confidence of exactly 1 is in the last bin.
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    confidence_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    denominator = counts.double()
    return ReliabilityBins(
        edges=torch.linspace(0, 1, bins + 1, dtype=torch.float64),
        counts=counts,
        confidence=confidence_sum / denominator,
        accuracy=correct_sum / denominator,
    )


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    return reliability_bins(probabilities, labels, bins).ece


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    log_probabilities = torch.log_softmax(logits.double() / temperature, dim=1)
    return float(-log_probabilities.gather(1, labels.view(-1, 1)).mean())


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, inverse_temperature: float) -> float:
    """d NLL / d(1/T) at 1/T = ``inverse_temperature``."""
    probabilities = torch.softmax(logits * inverse_temperature, dim=1)
    expected = (probabilities * logits).sum(1)
    return float((expected - logits.gather(1, labels.view(-1, 1)).squeeze(1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on these labelled logits."""
    if len(logits) == 0:
        raise ValueError("fitting a temperature needs at least one labelled image")
    logits = logits.double().cpu()
    labels = labels.cpu()
    low, high = math.log(1 / TEMPERATURE_RANGE[1]), math.log(1 / TEMPERATURE_RANGE[0])  # of 1/T
    if _nll_slope(logits, labels, math.exp(low)) >= 0:
        return TEMPERATURE_RANGE[1]
    if _nll_slope(logits, labels, math.exp(high)) <= 0:
        return TEMPERATURE_RANGE[0]
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if _nll_slope(logits, labels, math.exp(middle)) < 0:
            low = middle
        else:
            high = middle
    return 1 / math.exp((low + high) / 2)
