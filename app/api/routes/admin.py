"""The admin routes (Bearer ``APP_ADMIN_TOKEN``): ``POST /admin/reload`` hot-swaps the served model from a
checkpoint directory, ``POST /admin/promote/{version}`` from the model registry."""

from __future__ import annotations

import time

from fastapi import APIRouter

from app.api.deps import ControlPlaneDep, EngineDep, RequireAdmin, SettingsDep
from app.api.schemas import ErrorResponse, Promotion, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])

_AUTH_ERRORS = {
    401: {"model": ErrorResponse, "description": "no Bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
}


@router.post("/reload", responses={
    400: {"model": ErrorResponse, "description": "the checkpoint cannot be loaded or verified"}, **_AUTH_ERRORS,
})
async def reload(engine: EngineDep, settings: SettingsDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify and warm up a checkpoint (the given one, else ``APP_WEIGHTS``), then swap it in between
    two batches. Requests in flight finish on the old model; none fail. The old model keeps serving if
    the new one cannot be loaded."""
    weights = body.weights if body and body.weights else str(settings.weights)
    previous = engine.version
    started = time.perf_counter()
    card = await engine.swap(weights)
    return ReloadResponse(model_version=card.version, previous_version=previous, weights=weights,
                          seconds=round(time.perf_counter() - started, 3))


@router.post("/promote/{version}", response_model=Promotion, responses={
    404: {"model": ErrorResponse, "description": "no such version in the registry"}, **_AUTH_ERRORS,
})
async def promote(control_plane: ControlPlaneDep, engine: EngineDep, version: str) -> Promotion:
    """Serve ``version`` now (hot swap, no failed requests) and make it the registry's current version."""
    previous = engine.version
    await control_plane.promoter.promote(version)
    return Promotion(version=version, previous_version=previous)
