"""Shared route dependencies as ``Annotated`` aliases, so endpoint signatures stay short, and the admin guard.

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
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import AdminDisabled, NotAuthenticated, WrongToken
from app.api.forward import ControlLink
from app.classification.classifier import Classifier
from app.classification.explanations import Explainer
from app.config import Settings
from app.control.follower import RegistryFollower
from app.control.jobs.runner import JobRunner
from app.control.plane import ControlPlane, InitialModel
from app.engine.engine import InferenceEngine
from app.service_metrics import ServiceMetrics


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def _classifier(request: Request) -> Classifier:
    return request.app.state.classifier


async def _explainer(request: Request) -> Explainer:
    return request.app.state.explainer


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def _control_plane(request: Request) -> ControlPlane:
    return request.app.state.control_plane  # the control app's only (app/control/service.py)


async def _follower(request: Request) -> RegistryFollower:
    return request.app.state.follower  # a serving app's only


async def _control_link(request: Request) -> ControlLink:
    return request.app.state.control_link  # a serving app's only


async def _initial_model(request: Request) -> InitialModel:
    return request.app.state.initial_model


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[InferenceEngine, Depends(_engine)]
ClassifierDep = Annotated[Classifier, Depends(_classifier)]
ExplainerDep = Annotated[Explainer, Depends(_explainer)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
ControlPlaneDep = Annotated[ControlPlane, Depends(_control_plane)]
FollowerDep = Annotated[RegistryFollower, Depends(_follower)]
ControlLinkDep = Annotated[ControlLink, Depends(_control_link)]
InitialModelDep = Annotated[InitialModel, Depends(_initial_model)]


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
