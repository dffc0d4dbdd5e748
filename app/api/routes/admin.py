"""``POST /admin/reload`` (Bearer ``APP_ADMIN_TOKEN``): which checkpoint one serving replica serves.

It changes one replica's engine and nothing else: it serves a registry version or a checkpoint directory under an
allowed folder, and writes nothing (serving replicas only read the registry). The replica keeps it until the
registry's pointer changes or the replica restarts; what every replica serves changes by promotion
(``app/api/routes/promotion.py``). A path outside the allowed folders is refused before anything is read from
it, so the route cannot be used to probe the file system or read another file's contents into an error message.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter

from app.api.deps import AUTH_ERRORS, RequireAdmin, SettingsDep
from app.api.errors import BadRequest
from app.api.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from app.api.serving_deps import EngineDep, FollowerDep, InitialModelDep
from app.config import Settings
from app.control.plane import InitialModel

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])


@router.post("/reload", responses={
    400: {"model": ErrorResponse, "description": "the checkpoint is outside the allowed folders, or cannot be "
          "loaded or verified"},
    404: {"model": ErrorResponse, "description": "no such version in the registry"}, **AUTH_ERRORS,
})
async def reload(engine: EngineDep, follower: FollowerDep, initial: InitialModelDep,
                 settings: SettingsDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify and warm up a checkpoint (a registry version, a checkpoint directory under an allowed
    folder, else the one chosen at start-up) and swap it in between two batches, on this replica only.
    Requests in flight finish on the old model; none fail. The old model keeps serving if the new one cannot
    be loaded. To change what every replica serves, promote a registry version (``POST /admin/promote``)."""
    previous = engine.version
    started = time.perf_counter()
    if body is not None and body.version:
        path = await asyncio.to_thread(follower.registry().path, body.version)  # UnknownVersion: 404
        origin = f"registry version {body.version}, POST /admin/reload"
    else:
        weights = allowed_checkpoint(body.weights, settings) if body and body.weights else _start_up_weights(initial)
        path, origin = Path(weights), f"POST /admin/reload of {weights}"
    card = await engine.swap(path, origin=origin)
    return ReloadResponse(model_version=card.version, previous_version=previous, weights=str(path),
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
