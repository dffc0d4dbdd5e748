"""Request and response bodies of the JSON API. The answer for one image, ``Prediction``, is the classification
pipeline's own (``app/classification/answers.py``); the KServe v2 bodies are in ``app/api/routes/v2.py``."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.classification.answers import Prediction
from app.control.registry import RegisteredModel


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to do about it")


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded file, in upload order")


class BatchingSettings(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    parallel_batches: int
    request_timeout_s: float


class RequestLimits(BaseModel):
    """What one request may hold, so a client can size its uploads before it sends them."""

    max_upload_bytes: int = Field(description="largest /predict, /predict/batch or v2 infer body "
                                  "(APP_MAX_UPLOAD_BYTES)")
    max_batch_files: int = Field(description="most images in one /predict/batch or v2 infer request "
                                 "(APP_MAX_BATCH_FILES)")
    max_image_pixels: int = Field(description="largest image, width x height (APP_MAX_IMAGE_PIXELS)")
    max_request_pixels: int = Field(description="most pixels of all the images of one request "
                                    "(APP_MAX_REQUEST_PIXELS)")
    max_queue: int = Field(description="images waiting for the device before requests get 503 (APP_MAX_QUEUE)")
    max_json_bytes: int = Field(description="largest JSON body of the admin and training routes (APP_MAX_JSON_BYTES)")


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
    limits: RequestLimits


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


class ModelVersion(BaseModel):
    version: str
    architecture: str
    test_accuracy: float | None
    test_accuracy_tta: float | None
    epochs: int | None
    weights_sha256: str
    created_at: datetime
    registered_at: datetime
    source_job: str | None
    current: bool

    @classmethod
    def of(cls, model: RegisteredModel, current: str | None) -> ModelVersion:
        card = model.card
        return cls(version=model.version, architecture=card.architecture, test_accuracy=card.test_accuracy,
                   test_accuracy_tta=card.test_accuracy_tta, epochs=card.epochs, weights_sha256=card.weights_sha256,
                   created_at=card.created_at, registered_at=model.registered_at, source_job=model.source_job,
                   current=model.version == current)


class ModelListing(BaseModel):
    current: str | None
    serving: str | None
    versions: list[ModelVersion]


class Promotion(BaseModel):
    version: str
    previous_version: str | None
