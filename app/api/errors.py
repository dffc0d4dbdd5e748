"""The one place that decides which HTTP status each expected failure gets.

Errors are JSON ``{"detail": "<what is wrong and what to do>"}``; under ``/v2/`` they are ``{"error": ...}``,
the KServe v2 protocol's error object, so Triton and KServe clients can read them. Anything unexpected is
answered by the request middleware as a plain 500 and logged with its traceback.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.engine.errors import (
    DeadlineExceeded, EmptyImage, ImageTooLarge, InferenceFailed, InputSizeChanged, NoModelLoaded, QueueFull,
    ServiceStopping, UnsupportedImage,
)
from model.checkpoint import CheckpointError


class BadRequest(Exception):
    pass


class NotFound(Exception):
    pass


class PayloadTooLarge(Exception):
    pass


class UnsupportedMediaType(Exception):
    pass


STATUS: dict[type[Exception], int] = {
    BadRequest: 400,
    EmptyImage: 400,
    CheckpointError: 400,
    NotFound: 404,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    UnsupportedMediaType: 415,
    UnsupportedImage: 415,
    InferenceFailed: 500,
    NoModelLoaded: 503,
    QueueFull: 503,
    ServiceStopping: 503,
    InputSizeChanged: 503,
    DeadlineExceeded: 504,
}


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    key = "error" if request.url.path.startswith("/v2/") else "detail"
    return JSONResponse({key: message}, status_code=status, headers=headers)


async def _expected(request: Request, error: Exception) -> JSONResponse:
    status = next(code for kind, code in STATUS.items() if isinstance(error, kind))
    headers = None
    if isinstance(error, QueueFull):
        headers = {"Retry-After": str(error.retry_after_s)}
    elif isinstance(error, (NoModelLoaded, ServiceStopping, InputSizeChanged)):
        headers = {"Retry-After": "5"}
    return error_response(request, status, str(error), headers)


async def _http(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(request, error.status_code, str(error.detail), getattr(error, "headers", None))


async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
    )
    return error_response(request, 422, f"invalid request: {problems}")


def install_error_handlers(app: FastAPI) -> None:
    for kind in STATUS:
        app.add_exception_handler(kind, _expected)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
