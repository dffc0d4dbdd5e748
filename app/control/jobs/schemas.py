"""What a training job is, as the API shows it and the job store keeps it (its parameters: parameters.py)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from app.control.jobs.parameters import TrainParams


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
RESUMABLE_STATUSES = (JobStatus.INTERRUPTED, JobStatus.CANCELLED)


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
    reason: str | None = Field(None, description="why the model was or was not promoted")


class Job(BaseModel):
    id: str
    status: JobStatus
    params: TrainParams | None = Field(description="the training parameters; null when the stored record can no "
                                       "longer be read (the job is then shown failed, and error says why)")
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    result: JobResult | None = None
