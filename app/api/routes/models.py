"""The model registry's listing and by-hand promotion, for rolling forward or back."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from app.api.auth import RequireAdmin
from app.jobs.service import TrainingJobs
from app.registry import RegisteredModel, UnknownVersion

router = APIRouter(tags=["models"])


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


def _training(request: Request) -> TrainingJobs:
    return request.app.state.training


TrainingDep = Annotated[TrainingJobs, Depends(_training)]


@router.get("/models", response_model=ModelListing)
def list_models(training: TrainingDep, request: Request) -> ModelListing:
    """Every registered version, newest first; ``current`` is the registry's pointer, ``serving`` the version
    this replica answers with (they differ only for a moment after a promotion, or before any)."""
    current = training.registry.current()
    return ModelListing(current=current, serving=request.app.state.engine.version,
                        versions=[ModelVersion.of(m, current) for m in training.registry.versions()])


@router.post("/admin/promote/{version}", response_model=Promotion, dependencies=[RequireAdmin],
             responses={404: {"description": "no such version in the registry"}})
async def promote(training: TrainingDep, request: Request, version: str) -> Promotion:
    """Serve ``version`` now (hot swap, no failed requests) and make it the registry's current version."""
    previous = request.app.state.engine.version
    try:
        await training.promoter.promote(version)
    except UnknownVersion as error:
        raise HTTPException(404, str(error)) from None
    return Promotion(version=version, previous_version=previous)
