"""Request and response bodies of the JSON API (the KServe v2 ones are in ``app/api/routes/v2.py``)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydantic import BaseModel, Field

from model.checkpoint import ModelCard


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to do about it")


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


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded file, in upload order")


class BatchingSettings(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    parallel_batches: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    version: str
    architecture: str
    class_names: list[str]
    parameter_count: int
    test_accuracy: float | None = Field(description="final-epoch top-1 on the CIFAR-10 test set, from the card")
    trained_at: datetime = Field(description="when the checkpoint was written")
    input_size: int
    mean: list[float]
    std: list[float]
    device: str
    dtype: str
    origin: str = Field(description="why this checkpoint is served: the shipped default, APP_WEIGHTS, the "
                        "registry's current version, a promotion or an /admin/reload")
    batching: BatchingSettings


class ReloadRequest(BaseModel):
    weights: str | None = Field(None, description="checkpoint directory to load; default: the one chosen at "
                                "start-up (APP_WEIGHTS, else the shipped default)")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    weights: str
    seconds: float


class Readiness(BaseModel):
    status: str
    model_version: str | None = None
