"""Stage 6 of the classification pipeline: the network's logits become what an answer says about them, the
(calibrated) probabilities and the out-of-distribution score and flag, by ``model.trust`` with the card
of the model that computed them.

One place for every endpoint: ``/predict``, ``/predict/batch``, the KServe v2 ``infer`` and ``/explain``
all get their probabilities here, so ``APP_CALIBRATION`` means the same for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.card import ModelCard
from model.features import GaussianStatistics
from model.trust import assess


@dataclass(frozen=True)
class AssessedOutput:
    probabilities: np.ndarray           # (images, classes), float32; calibrated when the card and settings say so
    ood_scores: np.ndarray | None       # (images,), float32: the card's OOD score; None without a calibration
    in_distribution: np.ndarray | None  # (images,), bool; None without a calibration
    card: ModelCard                     # of the model that computed every row

    def __len__(self) -> int:
        return len(self.probabilities)


def assess_logits(logits: np.ndarray, card: ModelCard, *, calibrated: bool, features: np.ndarray | None = None,
                  statistics: GaussianStatistics | None = None) -> AssessedOutput:
    """``calibrated``: apply the card's temperature (``APP_CALIBRATION=on``); without a calibration in the
    card the probabilities are the raw softmax whatever it says, and there is no OOD flag. ``features`` (of
    the same pass) and ``statistics`` (the served checkpoint's): for a card whose OOD rule reads features."""
    assessment = assess(torch.from_numpy(logits), card.calibration, calibrated=calibrated,
                        features=None if features is None else torch.from_numpy(features), statistics=statistics)
    score, inside = assessment.score, assessment.in_distribution
    return AssessedOutput(
        probabilities=assessment.probabilities.numpy(),
        ood_scores=None if score is None else score.numpy(),
        in_distribution=None if inside is None else inside.numpy(),
        card=card,
    )
