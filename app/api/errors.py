"""The one place that decides which HTTP status each expected failure gets (``STATUS``).

Routes and dependencies raise domain errors (the engine's, the pipeline's, the control plane's, or the few
HTTP-only ones defined here); none of them raises ``HTTPException``. Errors are JSON
``{"detail": "<what is wrong and what to do>"}``; under ``/v2/`` they are ``{"error": ...}``, the KServe v2
protocol's error object, so Triton and KServe clients can read them. Anything unexpected is answered by
the request middleware as a plain 500 and logged with its traceback.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.control.jobs.runner import JobStateError
from app.control.jobs.store import JobConflict, JobStoreUnavailable, UnknownJob, UnstorableParams
from app.control.plane import JobsNotRunHere
from app.control.promotion import SwapFailed as PromotionSwapFailed
from app.control.registry import PromotionBusy, UnknownVersion
from app.engine.errors import (
    DeadlineExceeded,
    EmptyImage,
    ExplainerBusy,
    ExplanationUnavailable,
    ImageTooLarge,
    InferenceFailed,
    InputSizeChanged,
    NoModelLoaded,
    QueueFull,
    ServiceStopping,
    SwapFailed,
    SwapTimedOut,
    UnknownClass,
    UnsupportedImage,
)
from model.card import CheckpointError


class BadRequest(Exception):
    pass


class NotFound(Exception):
    pass


class PayloadTooLarge(Exception):
    pass


class UnsupportedMediaType(Exception):
    pass


class NotAuthenticated(Exception):
    """No Bearer token where the admin token is required."""


class WrongToken(Exception):
    pass


class AdminDisabled(Exception):
    """The admin routes are off: no APP_ADMIN_TOKEN is configured."""


STATUS: dict[type[Exception], int] = {
    BadRequest: 400,
    UnknownClass: 400,
    EmptyImage: 400,
    CheckpointError: 400,
    NotAuthenticated: 401,
    WrongToken: 403,
    AdminDisabled: 403,
    NotFound: 404,
    UnknownJob: 404,
    UnknownVersion: 404,
    JobConflict: 409,
    JobStateError: 409,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    UnsupportedMediaType: 415,
    UnsupportedImage: 415,
    SwapFailed: 422,  # the checkpoint was read, but cannot be served here; the previous model still is
    PromotionSwapFailed: 422,  # the same, for a promotion: the registry's pointer is unchanged
    UnstorableParams: 422,
    InferenceFailed: 500,
    NoModelLoaded: 503,
    QueueFull: 503,
    ServiceStopping: 503,
    InputSizeChanged: 503,
    JobsNotRunHere: 503,
    JobStoreUnavailable: 503,  # the job database did not answer in time: retry later
    PromotionBusy: 503,  # another promotion holds the registry's lock
    ExplainerBusy: 503,
    ExplanationUnavailable: 503,
    DeadlineExceeded: 504,
    SwapTimedOut: 504,
}


def status_of(error: Exception) -> int:
    """The status of the most specific class in ``STATUS`` that ``error`` is an instance of."""
    kind = next(kind for kind in type(error).__mro__ if kind in STATUS)
    return STATUS[kind]


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return _error_body(request.url.path, status, message, headers)


def expected_response(path: str, error: Exception) -> JSONResponse:
    """The response to an expected failure (one of ``STATUS``'s), also for middleware that answers before
    the routes run."""
    status = status_of(error)
    headers = None
    if isinstance(error, (QueueFull, ExplainerBusy)):
        headers = {"Retry-After": str(error.retry_after_s)}
    elif isinstance(error, (NoModelLoaded, ServiceStopping, InputSizeChanged, JobStoreUnavailable, PromotionBusy)):
        headers = {"Retry-After": "5"}
    elif isinstance(error, NotAuthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    return _error_body(path, status, str(error), headers)


def _error_body(path: str, status: int, message: str, headers: dict[str, str] | None) -> JSONResponse:
    key = "error" if path.startswith("/v2/") else "detail"
    return JSONResponse({key: message}, status_code=status, headers=headers)


async def _expected(request: Request, error: Exception) -> JSONResponse:
    response = expected_response(request.url.path, error)
    if response.status_code >= 500 and not is_admin(request):
        # A 5xx reason can name where the service keeps its files; only an admin needs that (it is logged).
        response = _error_body(request.url.path, response.status_code, redact_paths(str(error)),
                               {key: value for key, value in response.headers.items()
                                if key.lower() in ("retry-after",)} or None)
    return response


# Not after an HTTP method: "POST /admin/reload" is a route to call, not a file.
_ABSOLUTE_PATH = re.compile(r"(?<!GET )(?<!POST )(?<![\w.:/])/(?:[^\s/'\"(),;]+/)*([^\s/'\"(),;]+)")


def redact_paths(text: str) -> str:
    """``text`` with each absolute path cut to its last part: ``/srv/models/v3`` becomes ``…/v3``."""
    return _ABSOLUTE_PATH.sub(lambda match: f"…/{match.group(1)}", text)


def is_admin(request: Request) -> bool:
    """Whether the request carries the admin token (the fuller answers are for operators only)."""
    from app.api.deps import admin_refusal  # deps imports this module's errors

    return admin_refusal(request.app.state.settings, request.headers.get("authorization")) is None


async def _http(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own HTTP errors (an unknown route is a 404, a wrong method a 405), in this API's shape."""
    assert isinstance(error, HTTPException)
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == 405:
        # Starlette lists the methods of the one route that matched; a path served by several routes
        # (GET and POST /train) allows all of theirs.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(request, error.status_code, str(error.detail), headers or None)


def _allowed_methods(request: Request) -> list[str]:
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


async def _validation(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
    )
    return error_response(request, 422, f"invalid request: {problems}")


def install_error_handlers(app: FastAPI) -> None:
    for kind in STATUS:
        app.add_exception_handler(kind, _expected)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
