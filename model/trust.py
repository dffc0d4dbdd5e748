"""How far an answer can be trusted: calibrated probabilities and an in-distribution flag, from the logits.

Pure functions of a logits tensor ``(N, classes)`` and a card's ``calibration`` (``model.checkpoint.Calibration``),
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.checkpoint import Calibration

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


@dataclass(frozen=True)
class Assessment:
    probabilities: torch.Tensor            # (N, classes), float32: calibrated unless asked otherwise
    score: torch.Tensor | None             # (N,), the card's OOD score; None for a card without calibration
    in_distribution: torch.Tensor | None   # (N,), bool; None for a card without calibration


def assess(logits: torch.Tensor, calibration: Calibration | None, *, calibrated: bool = True) -> Assessment:
    """Everything a prediction reports about trust, for a batch of raw logits.

    ``calibrated=False`` gives the raw softmax (``APP_CALIBRATION=off``); the OOD flag does not depend on it,
    since its threshold was chosen for the score as the card defines it. A card without ``calibration`` (one
    written before calibration existed, or trained without a holdout) gives the raw softmax and no flag.
    """
    if calibration is None:
        return Assessment(calibrated_probabilities(logits), None, None)
    temperature = calibration.temperature if calibrated else 1.0
    rule = calibration.ood
    score = ood_score(logits, rule.score, rule.temperature)
    return Assessment(calibrated_probabilities(logits, temperature), score,
                      in_distribution(score, rule.threshold, rule.upper_threshold))
