"""``create_control_app(settings)``: the control plane's own ASGI app, run by ``python -m app.control``.

It serves the routes that write: the job API (``/train`` and under it) and ``POST /admin/promote/{version}``,
behind the same admin gate as the serving app (the token, compared in constant time, before any body is
read), and its own ``/healthz``, ``/readyz`` and ``/metrics``. Its lifespan opens the job store, stands for
job-runner election (APP_RUN_JOBS) and closes them. It loads no model: serving replicas learn of what it
promotes through the registry (docs/design.md). A failure here (the job database unreachable at start-up)
ends this process, which its supervisor restarts; the serving replicas keep answering meanwhile. So it
imports no torch either: on one machine each restart shares the serving process's cores, and torch's import
was most of a restart's CPU (``benchmarks/control_start.py``; tests/app/control/test_service.py checks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import __version__
from app.api.deps import ControlPlaneDep, MetricsDep
from app.api.errors import install_error_handlers
from app.api.middleware import AdminGate, RequestContextMiddleware
from app.api.routes import promotion, train
from app.api.schemas import Liveness, Readiness
from app.config import Settings
from app.control.plane import open_control_plane
from app.logging import configure_logging
from app.service_metrics import ServiceMetrics

health = APIRouter(tags=["health"])


@health.get("/healthz")
async def healthz(control_plane: ControlPlaneDep) -> Liveness:
    """200 while the control plane is up; ``job_runner`` says whether it runs the jobs or stands by."""
    return Liveness(status="alive", job_runner=control_plane.job_runner)


@health.get("/readyz")
async def readyz(control_plane: ControlPlaneDep) -> Readiness:
    """200 once the job store is open and the runner election has been stood for (the lifespan's work)."""
    return Readiness(status="ready")


@health.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_control_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(title="cifar-serve control plane", version=__version__,
                  summary="training jobs and model promotion for cifar-serve's serving replicas", lifespan=_lifespan)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    install_error_handlers(app)
    app.add_middleware(AdminGate, settings=settings, prefixes=(promotion.router.prefix, train.router.prefix))
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    for routes in (train.router, promotion.router, health):
        app.include_router(routes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.control_plane = control_plane = await open_control_plane(app.state.settings)
    try:
        yield
    finally:
        await control_plane.close()  # a running training job is stopped and marked interrupted, never orphaned
