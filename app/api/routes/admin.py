"""The admin routes (Bearer ``APP_ADMIN_TOKEN``): ``POST /admin/reload`` serves a registry version or a
checkpoint directory under an allowed folder, ``POST /admin/promote/{version}`` a registry version.

Both go through the registry: a reloaded checkpoint is registered, served, and made the registry's
``current``, so every replica polling the registry follows, and a restart keeps it. A path outside the
allowed folders is refused before anything is read from it, so the route cannot be used to probe the
file system or read another file's contents into an error message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from app.api.deps import ControlPlaneDep, EngineDep, InitialModelDep, RequireAdmin, SettingsDep
from app.api.errors import BadRequest
from app.api.schemas import ErrorResponse, Promotion, ReloadRequest, ReloadResponse
from app.config import Settings
from app.control.plane import InitialModel

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no Bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
}


@router.post("/reload", responses={
    400: {"model": ErrorResponse, "description": "the checkpoint is outside the allowed folders, or cannot be "
          "loaded or verified"},
    404: {"model": ErrorResponse, "description": "no such version in the registry"}, **_AUTH_ERRORS,
})
async def reload(engine: EngineDep, control_plane: ControlPlaneDep, initial: InitialModelDep,
                 settings: SettingsDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify and warm up a checkpoint (a registry version, a checkpoint directory under an allowed
    folder, else the one chosen at start-up), swap it in between two batches, and make it the registry's
    current version. Requests in flight finish on the old model; none fail. The old model keeps serving
    if the new one cannot be loaded."""
    previous = engine.version
    started = time.perf_counter()
    promoter = control_plane.promoter
    if body is not None and body.version:
        registered = await promoter.promote(body.version, origin=f"registry version {body.version}, "
                                            "POST /admin/reload")
        weights = registered.path
    else:
        weights = allowed_checkpoint(body.weights, settings) if body and body.weights else _start_up_weights(initial)
        registered = await promoter.serve_checkpoint(Path(weights), origin=f"POST /admin/reload of {weights}")
    return ReloadResponse(model_version=registered.version, previous_version=previous, weights=weights,
                          seconds=round(time.perf_counter() - started, 3))


def reload_roots(settings: Settings) -> list[Path]:
    """The folders whose checkpoints ``/admin/reload`` may load, resolved."""
    roots = [settings.shipped_weights, *settings.reload_roots]
    if settings.weights is not None:
        roots.append(settings.weights)
    return [root.resolve() for root in roots]


def allowed_checkpoint(weights: str, settings: Settings) -> str:
    """``weights`` if it resolves (links and ``..`` followed) to a folder under an allowed root."""
    try:
        resolved = Path(weights).resolve()
    except (ValueError, OSError):  # a NUL byte, a symlink loop
        resolved = None
    if resolved is None or not any(resolved.is_relative_to(root) for root in reload_roots(settings)):
        raise BadRequest(f"{weights} is not under a folder /admin/reload may load from (the shipped weights, "
                         "APP_WEIGHTS, APP_RELOAD_ROOTS); name a registry version instead, "
                         '{"version": "..."} (GET /models lists them), or add its folder to APP_RELOAD_ROOTS')
    return weights


def _start_up_weights(choice: InitialModel) -> str:
    if choice.path is None:
        raise BadRequest(f"no checkpoint to reload: {choice.origin}; name one in the body, "
                         '{"version": "<registry version>"} or {"weights": "path/to/checkpoint"}')
    return str(choice.path)


@router.post("/promote/{version}", response_model=Promotion, responses={
    404: {"model": ErrorResponse, "description": "no such version in the registry"}, **_AUTH_ERRORS,
})
async def promote(control_plane: ControlPlaneDep, engine: EngineDep, version: str) -> Promotion:
    """Serve ``version`` now (hot swap, no failed requests) and make it the registry's current version."""
    previous = engine.version
    await control_plane.promoter.promote(version)
    return Promotion(version=version, previous_version=previous)
