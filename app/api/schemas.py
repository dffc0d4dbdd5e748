"""Request and response bodies of the JSON API. The answer for one image, ``Prediction``, is the classification
pipeline's own (``app/classification/answers.py``); the KServe v2 bodies are in ``app/api/routes/v2.py``."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.classification.answers import Prediction
from app.control.registry import RegisteredModel
from app.engine.verification_status import BackendVerificationStatus
from model.card import Calibration


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to do about it")


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded file, in upload order")


class ExplanationResponse(BaseModel):
    """``POST /explain?format=json``: the prediction and its Grad-CAM heat map."""

    prediction: Prediction = Field(description="as /predict answers it (calibrated the same way)")
    explained_class: str = Field(description="the class the heat map explains: ?class=, else the predicted one")
    explained_index: int
    layer: str = Field(description="the network module whose feature map Grad-CAM weighed")
    heatmap_width: int = Field(description="the map is the model's input size (32x32), not the upload's")
    heatmap_height: int
    heatmap_png_base64: str = Field(description="8-bit grayscale PNG, base64: 255 where the evidence for the "
                                    "class peaks, 0 where there is none (Selvaraju et al. 2017, Grad-CAM)")


class BatchingSettings(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    parallel_batches: int
    request_timeout_s: float


class OutOfDistributionInfo(BaseModel):
    score: Literal["energy", "msp", "features"] = Field(
        description="the kind of every prediction's ood_score: energy = T·logsumexp(logits/T) (Liu et al. 2020), "
                    "msp = max softmax(logits/T) (Hendrycks & Gimpel 2017), features = the network's first-stage "
                    "features against those of training images, with the energy (the card's calibration.ood "
                    "says how); higher = more like the training images")
    temperature: float = Field(description="the T inside the score")
    threshold: float = Field(description="in_distribution is true when ood_score >= threshold ...")
    upper_threshold: float | None = Field(description="... and, when this is set, ood_score <= it")
    target_tpr: float = Field(description="share of holdout images the threshold was chosen to keep")
    test_tpr: float | None = Field(description="share of CIFAR-10 test images it keeps")


class CalibrationInfo(BaseModel):
    applied: bool = Field(description="whether the served probabilities are temperature-scaled: "
                          "APP_CALIBRATION=on (the default) and this calibration exists")
    temperature: float = Field(description="the probabilities are softmax(logits / temperature) when applied")
    fitted_on: str = Field(description="the images the temperature and the OOD threshold were fitted on")
    ece_bins: int = Field(description="equal-width confidence bins of the expected calibration error")
    test_ece_before: float | None = Field(description="test-set ECE, 0..1, of the raw softmax")
    test_ece_after: float | None = Field(description="the same with the temperature applied")
    test_nll_before: float | None = Field(description="test-set mean negative log-likelihood (nats), raw")
    test_nll_after: float | None = Field(description="the same with the temperature applied")
    ood: OutOfDistributionInfo

    @classmethod
    def of(cls, calibration: Calibration, applied: bool) -> CalibrationInfo:
        rule = calibration.ood
        return cls(applied=applied, temperature=calibration.temperature, fitted_on=calibration.fitted_on,
                   ece_bins=calibration.ece_bins, test_ece_before=calibration.test_ece_before,
                   test_ece_after=calibration.test_ece_after, test_nll_before=calibration.test_nll_before,
                   test_nll_after=calibration.test_nll_after,
                   ood=OutOfDistributionInfo(score=rule.score, temperature=rule.temperature,
                                             threshold=rule.threshold, upper_threshold=rule.upper_threshold,
                                             target_tpr=rule.target_tpr, test_tpr=rule.test_tpr))


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
    backend: str = Field(description="how the model runs: a CPU backend of model/inference.py (fused, eager, onnx, "
                         "bf16, int8), or fp32 or bf16 on CUDA; chosen again at every swap (APP_CPU_BACKEND, "
                         "APP_CUDA_PRECISION)")
    backend_reason: str = Field(description="why this backend serves: the verified accuracy and speed from the "
                                "checkpoint's backends-<device>.json, an explicit setting, or why no report holds")
    backend_test_accuracy: float | None = Field(
        description="this backend's test accuracy (0..1) as the checkpoint's backend report measured it on the "
        "whole test set: what the answers are worth when it is not the card's float32 test_accuracy; null "
        "without a valid report")
    origin: str = Field(description="why this checkpoint is served: the shipped default, APP_WEIGHTS, the "
                        "registry's current version, a promotion or an /admin/reload")
    backend_verification: BackendVerificationStatus | None = Field(
        default=None, description="the service's own verification of its CPU backends on this machine: "
        "waiting, verifying, verified (with each backend's figures), kept_reference (and why), pinned by "
        "APP_CPU_BACKEND, or not_applicable on CUDA")
    batching: BatchingSettings
    calibration: CalibrationInfo | None = Field(
        description="the card's temperature scaling and OOD rule (model/trust.py), and whether the temperature "
        "is applied; null for a checkpoint without one: its probabilities are the raw softmax and every "
        "prediction's in_distribution and ood_score are null")


    limits: RequestLimits


class ReloadRequest(BaseModel):
    version: str | None = Field(None, description="registry version to serve (GET /models lists them)")
    weights: str | None = Field(None, description="checkpoint directory to load, under the shipped weights, "
                                "APP_WEIGHTS or APP_RELOAD_ROOTS; default: the one chosen at start-up")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    weights: str
    seconds: float


class Readiness(BaseModel):
    status: str
    model_version: str | None = None
    registry_error: str | None = Field(None, description="why the registry's pointer could not be read at the "
                                       "last check; the replica keeps serving its model and retries; null when "
                                       "it could")
    control_plane: str | None = Field(None, description="the control plane as this replica last saw it: ready, "
                                      "starting, unreachable (why) or off; it never makes /readyz fail")


class Liveness(BaseModel):
    status: str
    model_version: str | None = Field(None, description="the model being served; null while none is")
    job_runner: Literal["runner", "standby", "off", "unknown"] = Field(
        description="whether the control plane this replica forwards to runs the training jobs (runner: it "
        "holds the job database's lock), may take over from the one that does (standby), never does (off: "
        "APP_RUN_JOBS=false), or cannot be reached now (unknown)")


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
