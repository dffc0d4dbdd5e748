"""Stage 7 of the classification pipeline: the answer for one image, as the JSON API returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from model.card import ModelCard

if TYPE_CHECKING:  # a stage-6 output only reaches Prediction.of; the bodies of app/api/schemas.py need no torch
    from app.classification.probabilities import AssessedOutput


class ClassProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    index: int = Field(description="its index in the model's class list")
    confidence: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class name -> probability; they sum to 1. "
                                            "Temperature-scaled with the model card's calibration unless "
                                            "APP_CALIBRATION=off (GET /model says which)")
    top_k: list[ClassProbability] = Field(description="the top_k most probable classes, descending")
    in_distribution: bool | None = Field(
        description="whether the image looks like the images the model was trained on (its OOD score passes "
        "the card's threshold); false means it is likely none of the classes, whatever the label says. null "
        "when the model's checkpoint has no calibration (GET /model: calibration is null)")
    ood_score: float | None = Field(
        description="the out-of-distribution score behind in_distribution, higher = more like the training "
        "images; its kind and threshold are in GET /model (calibration.ood). null without a calibration")
    model_version: str = Field(description="the model that computed this prediction")

    @classmethod
    def of(cls, output: AssessedOutput, row: int, top_k: int) -> Prediction:
        """The answer for row ``row`` of a batch's assessed output."""
        return cls.from_probabilities(
            output.probabilities[row], output.card, top_k,
            ood_score=None if output.ood_scores is None else float(output.ood_scores[row]),
            in_distribution=None if output.in_distribution is None else bool(output.in_distribution[row]))

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, card: ModelCard, top_k: int, *,
                           ood_score: float | None = None, in_distribution: bool | None = None) -> Prediction:
        names = card.class_names
        values = probabilities.tolist()
        # A stable sort keeps equal probabilities in class order, so answers are deterministic.
        order = np.argsort(-probabilities, kind="stable")[:top_k].tolist()
        best = order[0]
        return cls(
            label=names[best],
            index=best,
            confidence=values[best],
            probabilities=dict(zip(names, values)),
            top_k=[ClassProbability(label=names[i], probability=values[i]) for i in order],
            in_distribution=in_distribution,
            ood_score=ood_score,
            model_version=card.version,
        )
