"""What a training job is, as the API shows it and the job store keeps it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from model.architectures import ARCHITECTURES


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
RESUMABLE_STATUSES = (JobStatus.INTERRUPTED, JobStatus.CANCELLED)


class TrainParams(BaseModel):
    """The body of ``POST /train``. Every field is optional; each default is the training module's own
    (``python -m training --help`` explains them; a test keeps the two in step), and each maps to one flag.
    The bounds are the training module's, checked here so that a bad value is a 422 naming the field rather
    than a job that fails a second later."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field("resnet50", description="network architecture")
    epochs: int = Field(35, ge=1, le=10_000, description="training epochs")
    batch_size: int = Field(512, ge=2, le=65_536, description="global batch, split evenly across the GPUs")
    lr: float | None = Field(None, gt=0, le=100, description="peak learning rate; null = 0.1 per 128 images "
                             "of batch_size")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 on conv and linear weights")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    warmup_epochs: float = Field(2.0, ge=0, validate_default=True, description="linear warm-up length; at most "
                                 "epochs")
    lr_decay: Literal["linear", "cosine"] = Field("linear", description="decay shape from the peak to zero")
    cutout: int = Field(0, ge=0, le=32, description="side of the cut-out square in pixels; 0 = off")
    ema: bool = Field(False, description="evaluate and save an exponential moving average of the weights")
    tta: bool = Field(True, description="also report horizontal-flip test-time-augmentation accuracy")
    compile: bool = Field(False, description="torch.compile the training step")
    deterministic: bool = Field(False, description="deterministic kernels only: slower, bit-reproducible")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    gpus: int = Field(1, ge=1, le=64, description="GPUs to train on; more than 1 launches torchrun")
    checkpoint_every: int = Field(10, ge=1, description="write the resumable training state every N epochs")
    eval_every: int = Field(0, ge=0, description="also evaluate every N epochs; 0 = after the last only")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training images (smoke runs)")
    test_limit: int | None = Field(None, ge=1, description="use only the first N test images (smoke runs)")
    holdout: int = Field(0, ge=0, description="keep the last N training images out, as a validation split")
    plots: bool = Field(True, description="write loss/accuracy curves and a confusion matrix as PNG")
    verify_backends: bool = Field(True, description="measure every inference backend on the test set at the end "
                                  "and write the report next to the checkpoint; skipped with test_limit")
    weights_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the saved weights")

    @field_validator("arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; choose one of {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_training(cls, value: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and value > epochs:
            raise ValueError(f"warmup_epochs {value:g} is longer than epochs {epochs}; make it at most {epochs}")
        return value

    @field_validator("gpus")
    @classmethod
    def _batch_splits_over_gpus(cls, value: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size")
        if batch_size is not None and batch_size % value:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {value} GPUs; make it a "
                             f"multiple of {value}")
        return value


class JobProgress(BaseModel):
    """The latest epoch line of the run's ``metrics.jsonl``."""

    epoch: int | None = None
    epochs: int | None = None
    train_loss: float | None = None
    test_accuracy: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None


class JobResult(BaseModel):
    model_version: str
    test_accuracy: float | None = Field(description="final-epoch top-1 on the test set, 0..1")
    promoted: bool


class Job(BaseModel):
    id: str
    status: JobStatus
    params: TrainParams
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    result: JobResult | None = None
