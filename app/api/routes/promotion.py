"""``POST /admin/promote/{version}`` (Bearer ``APP_ADMIN_TOKEN``): which registry version every replica serves.

Served by the control plane (``app/control/service.py``): it verifies the version's files and moves the
registry's pointer, which every serving replica follows. A serving replica forwards it there
(``app/api/forward.py``), serves the version itself before answering, and includes this router only so that
its OpenAPI document describes the route. To change what one replica serves, ``POST /admin/reload``
(``app/api/routes/admin.py``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.api.deps import AUTH_ERRORS, ControlPlaneDep, RequireAdmin
from app.api.schemas import ErrorResponse, Promotion

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[RequireAdmin])


@router.post("/promote/{version}", response_model=Promotion, responses={
    404: {"model": ErrorResponse, "description": "no such version in the registry"},
    503: {"model": ErrorResponse, "description": "the control plane cannot be reached; retry"}, **AUTH_ERRORS,
})
async def promote(control_plane: ControlPlaneDep, version: str) -> Promotion:
    """Make ``version`` the registry's current version, once its files verify; every serving replica follows
    (the one that forwarded this request serves it before answering). ``previous_version`` is the
    registry's current version before (else the model replicas start with, which they served)."""
    incumbent = control_plane.promoter.engine.card
    previous = await asyncio.to_thread(control_plane.registry.current) or (incumbent and incumbent.version)
    await control_plane.promoter.promote(version)
    return Promotion(version=version, previous_version=previous)
