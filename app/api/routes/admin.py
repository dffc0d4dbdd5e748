"""The admin routes (Bearer ``APP_ADMIN_TOKEN``): ``POST /admin/reload`` hot-swaps the served model from a
checkpoint directory, ``POST /admin/promote/{version}`` from the model registry."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from app.api.deps import ControlPlaneDep, EngineDep, InitialModelDep, RequireAdmin
from app.api.errors import BadRequest
from app.api.schemas import ErrorResponse, Promotion, ReloadRequest, ReloadResponse
from app.control.plane import InitialModel

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no Bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
}


@router.post("/reload", responses={
    400: {"model": ErrorResponse, "description": "the checkpoint cannot be loaded or verified"}, **_AUTH_ERRORS,
})
async def reload(engine: EngineDep, initial: InitialModelDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify and warm up a checkpoint (the given one, else the one chosen at start-up), then swap it in
    between two batches. Requests in flight finish on the old model; none fail. The old model keeps serving
    if the new one cannot be loaded."""
    weights = body.weights if body and body.weights else _start_up_weights(initial)
    previous = engine.version
    started = time.perf_counter()
    card = await engine.swap(weights, origin=f"POST /admin/reload of {weights}")
    return ReloadResponse(model_version=card.version, previous_version=previous, weights=weights,
                          seconds=round(time.perf_counter() - started, 3))


def _start_up_weights(choice: InitialModel) -> str:
    if choice.path is None:
        raise BadRequest(f"no checkpoint to reload: {choice.origin}; name one in the body, "
                         '{"weights": "path/to/checkpoint"}')
    return str(choice.path)


@router.post("/promote/{version}", response_model=Promotion, responses={
    404: {"model": ErrorResponse, "description": "no such version in the registry"}, **_AUTH_ERRORS,
})
async def promote(control_plane: ControlPlaneDep, engine: EngineDep, version: str) -> Promotion:
    """Serve ``version`` now (hot swap, no failed requests) and make it the registry's current version."""
    previous = engine.version
    await control_plane.promoter.promote(version)
    return Promotion(version=version, previous_version=previous)
