"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import MetricsDep
from app.api.errors import is_admin, redact_paths
from app.api.schemas import ErrorResponse, Liveness, Readiness
from app.api.serving_deps import ControlLinkDep, EngineDep, FollowerDep
from app.engine.errors import NoModelLoaded

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(engine: EngineDep, control: ControlLinkDep) -> Liveness:
    """200 while the process is alive (it answers even while the model loads); ``model_version`` names the
    model being served, null while none is."""
    return Liveness(status="alive", model_version=engine.version, job_runner=control.job_runner)


@router.get("/readyz", responses={503: {"model": ErrorResponse, "description": "no warm model yet"}})
async def readyz(request: Request, engine: EngineDep, follower: FollowerDep,
                 control: ControlLinkDep) -> Readiness:
    """200 only when a model is loaded and warmed up and the service is not shutting down. A registry that
    cannot be read (``registry_error``) or a control plane that cannot be reached (``control_plane``) is
    reported, never a reason to answer 503: the replica serves the model it has. The registry error names
    its full path for the admin token only, as every answer to anyone does."""
    if not engine.ready:
        raise NoModelLoaded(f"not ready: {engine.unavailable_reason}")
    registry_error = follower.error
    if registry_error is not None and not is_admin(request):
        registry_error = redact_paths(registry_error)
    return Readiness(status="ready", model_version=engine.version, registry_error=registry_error,
                     control_plane=control.state)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
