"""How far an answer can be trusted: calibrated probabilities and an in-distribution flag, from the logits.

Pure functions of a logits tensor ``(N, classes)`` and a card's ``calibration`` (``model.card.Calibration``),
so that training (which fits them, ``training.calibrate``), the benchmarks and the service compute the same
numbers:

- **temperature scaling** (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the probabilities are
  ``softmax(logits / T)`` with one temperature ``T`` fitted on a holdout split. It divides every logit by the
  same positive number, so the predicted class never changes; only the confidence does.
- **out-of-distribution scores**, both "higher = more like the training images":
  ``energy``, the negative free energy ``T · logsumexp(logits / T)`` (Liu et al. 2020, "Energy-based
  Out-of-distribution Detection", eq. 5 and its negative as the score), and ``msp``, the largest softmax
  probability ``max softmax(logits / T)`` (Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified
  and Out-of-Distribution Examples"). An image is in distribution when its score is at least the card's
  threshold, which training sets so that 95 % of the holdout images pass. A two-sided rule also has an upper
  threshold: a network can answer images unlike any it trained on (noise, for one) more strongly than real
  ones, so a score far above the holdout's is as suspect as one far below it (the "typicality" argument of
  Nalisnick et al. 2019, "Detecting Out-of-Distribution Inputs to Deep Generative Models Using Typicality").
- **a feature score** (issue 24): the logits alone flagged only half of some image kinds no training choice had
  seen (sketches, text); a rule of kind ``features`` also reads the network's features (``model.features``):
  minus the squared Mahalanobis distance of one part of them to the training images' statistics, standardised,
  plus, with a weight, the standardised energy (``feature_score``). Its thresholds are set the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.card import Calibration, FeatureScore
from model.features import GaussianStatistics, transform

ScoreKind = Literal["energy", "msp"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("energy", "msp")


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.float() / temperature


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)``; the argmax is the same for every temperature."""
    return torch.softmax(scale_logits(logits, temperature), dim=-1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy, ``T · logsumexp(logits / T)``: high for training-like images (Liu et al. 2020)."""
    return temperature * torch.logsumexp(scale_logits(logits, temperature), dim=-1)


def max_softmax_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The largest class probability, ``max softmax(logits / T)`` (Hendrycks & Gimpel 2017)."""
    return calibrated_probabilities(logits, temperature).amax(dim=-1)


def ood_score(logits: torch.Tensor, kind: ScoreKind, temperature: float = 1.0) -> torch.Tensor:
    """One score per image, of the given kind; higher means more like the training distribution."""
    if kind == "energy":
        return energy_score(logits, temperature)
    if kind == "msp":
        return max_softmax_score(logits, temperature)
    raise ValueError(f"unknown score kind {kind!r}; choose one of {', '.join(SCORE_KINDS)}")


def in_distribution(scores: torch.Tensor, threshold: float, upper_threshold: float | None = None) -> torch.Tensor:
    """True where the score reaches the threshold and, if there is one, stays at or below the upper threshold
    (the thresholds themselves count as in distribution)."""
    inside = scores >= threshold
    return inside if upper_threshold is None else inside & (scores <= upper_threshold)


def feature_score(logits: torch.Tensor, features: torch.Tensor, rule: FeatureScore,
                  statistics: GaussianStatistics) -> torch.Tensor:
    """The ``features`` rule's score, higher = more like the training images; ``features`` as
    ``model.features.joined`` gives them, the penultimate part as wide as ``statistics`` says."""
    width = len(statistics.mean)  # as wide as the part it was fitted on: the first or the last columns
    part = features[:, :width] if rule.part == "stage1" else features[:, -width:]
    values = transform(part, rule.transform)
    score = (statistics.score(values) - rule.feature_centre) / rule.feature_scale
    if rule.energy_weight:
        score = score + rule.energy_weight * (energy_score(logits) - rule.energy_centre) / rule.energy_scale
    return score


class MissingFeatures(ValueError):
    """A card whose OOD rule reads features, assessed without them (a caller's bug, never a client's)."""


@dataclass(frozen=True)
class Assessment:
    probabilities: torch.Tensor            # (N, classes), float32: calibrated unless asked otherwise
    score: torch.Tensor | None             # (N,), the card's OOD score; None for a card without calibration
    in_distribution: torch.Tensor | None   # (N,), bool; None for a card without calibration


def assess(logits: torch.Tensor, calibration: Calibration | None, *, calibrated: bool = True,
           features: torch.Tensor | None = None, statistics: GaussianStatistics | None = None) -> Assessment:
    """Everything a prediction reports about trust, for a batch of raw logits (and, for a card whose rule
    reads them, the features of the same forward pass and the checkpoint's ``ood_statistics``).

    ``calibrated=False`` gives the raw softmax (``APP_CALIBRATION=off``); the OOD flag does not depend on it,
    since its threshold was chosen for the score as the card defines it. A card without ``calibration`` (one
    written before calibration existed, or trained without a holdout) gives the raw softmax and no flag.
    """
    if calibration is None:
        return Assessment(calibrated_probabilities(logits), None, None)
    temperature = calibration.temperature if calibrated else 1.0
    rule = calibration.ood
    if rule.features is not None:
        if features is None or statistics is None:
            raise MissingFeatures("this card's OOD rule reads the network's features: pass features= (from "
                                  "model.features.joined) and statistics= (the checkpoint's ood_statistics)")
        score = feature_score(logits, features, rule.features, statistics)
    else:
        score = ood_score(logits, rule.score, rule.temperature)  # type: ignore[arg-type]
    return Assessment(calibrated_probabilities(logits, temperature), score,
                      in_distribution(score, rule.threshold, rule.upper_threshold))
