"""Route dependencies both apps use, as ``Annotated`` aliases so endpoint signatures stay short, and the admin guard.

What only a serving replica has (its engine, classifier, explainer, registry follower) is in ``serving_deps.py``:
it imports torch, and the control plane's app (``app/control/service.py``), which imports this module, must
start without it (``benchmarks/control_start.py``).

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, which on the
hot path costs a thread hop per dependency per request for what is an attribute lookup.

``RequireAdmin`` guards ``/admin/*`` and the job API (``dependencies=[RequireAdmin]``). Without
``APP_ADMIN_TOKEN`` those routes are disabled (403 saying how to enable them); there is no default token. A
missing or non-Bearer ``Authorization`` header gets 401, a wrong token 403. The comparison is constant-time
(``hmac.compare_digest``), so response timing does not leak the token. FastAPI reads a route's body before it
runs its dependencies, so ``AdminGate`` (``app/api/middleware.py``) makes the same decision, ``admin_refusal``,
before the body of an admin route is read; the dependency stays for the OpenAPI document and as a second line.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import AdminDisabled, NotAuthenticated, WrongToken
from app.api.schemas import ErrorResponse
from app.config import Settings
from app.control.jobs.runner import JobRunner
from app.control.plane import ControlPlane
from app.service_metrics import ServiceMetrics


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def _control_plane(request: Request) -> ControlPlane:
    return request.app.state.control_plane  # the control app's only (app/control/service.py)


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
ControlPlaneDep = Annotated[ControlPlane, Depends(_control_plane)]


async def _job_runner(control_plane: ControlPlaneDep) -> JobRunner:
    return control_plane.require_runner()  # JobsNotRunHere (503) on a replica with APP_RUN_JOBS=false


JobRunnerDep = Annotated[JobRunner, Depends(_job_runner)]

_bearer = HTTPBearer(auto_error=False, description="APP_ADMIN_TOKEN")


async def require_admin(settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    authorization = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    refusal = admin_refusal(settings, authorization)
    if refusal is not None:
        raise refusal


def admin_refusal(settings: Settings, authorization: str | None) -> Exception | None:
    """Why a request with this ``Authorization`` header may not use the admin routes; None when it may."""
    if settings.admin_token is None:
        return AdminDisabled("admin routes are disabled: set APP_ADMIN_TOKEN to a secret of at least 16 "
                             "characters and restart the service to enable them")
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return NotAuthenticated("send the admin token as 'Authorization: Bearer <APP_ADMIN_TOKEN>'")
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(token.strip().encode(), expected):
        return WrongToken("the admin token is wrong")
    return None


RequireAdmin = Depends(require_admin)
# What RequireAdmin answers, for the OpenAPI document of each route it guards.
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no Bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
}
