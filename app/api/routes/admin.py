"""``POST /admin/reload``: hot-swap the served model (Bearer ``APP_ADMIN_TOKEN``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from app.api.auth import RequireAdmin
from app.api.deps import EngineDep
from app.api.errors import BadRequest
from app.schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])


@router.post("/reload", responses={
    400: {"model": ErrorResponse, "description": "the checkpoint cannot be loaded or verified"},
    401: {"model": ErrorResponse, "description": "no Bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
    409: {"model": ErrorResponse, "description": "the checkpoint cannot replace the serving model"},
})
async def reload(request: Request, engine: EngineDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify and warm up a checkpoint (the given one, else the one chosen at start-up), then swap it in between
    two batches. Requests in flight finish on the old model; none fail. The old model keeps serving if
    the new one cannot be loaded."""
    weights = body.weights if body and body.weights else _start_up_weights(request)
    previous = engine.version
    started = time.perf_counter()
    card = await engine.swap(weights, origin=f"POST /admin/reload of {weights}")
    return ReloadResponse(model_version=card.version, previous_version=previous, weights=weights,
                          seconds=round(time.perf_counter() - started, 3))


def _start_up_weights(request: Request) -> str:
    choice = request.app.state.initial_model
    if choice.path is None:
        raise BadRequest(f"no checkpoint to reload: {choice.origin}; name one in the body, "
                         '{"weights": "path/to/checkpoint"}')
    return str(choice.path)
