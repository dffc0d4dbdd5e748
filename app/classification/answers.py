"""Stage 7 of the classification pipeline: the answer for one image, as the JSON API returns it."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from model.checkpoint import ModelCard


class ClassProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    index: int = Field(description="its index in the model's class list")
    confidence: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class name -> probability; they sum to 1")
    top_k: list[ClassProbability] = Field(description="the top_k most probable classes, descending")
    model_version: str = Field(description="the model that computed this prediction")

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, card: ModelCard, top_k: int) -> Prediction:
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
            model_version=card.version,
        )
