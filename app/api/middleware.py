"""Per-request context, as a plain ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path).

For every HTTP request it: takes the client's ``X-Request-ID`` when it is a sane token (else makes one) and
returns it on the response; puts it in the logging context; counts the request and times it by route
template (``/predict``, not the raw path, so metrics stay bounded); writes one JSON access-log line; and
answers any unhandled exception with a plain JSON 500, logged with its traceback, so no input can surface
a stack trace or take the process down.

``UploadBudgetGate`` keeps the request bodies being read within ``APP_MAX_UPLOAD_BYTES_IN_FLIGHT`` together:
a body's declared Content-Length is reserved before a byte of it is read (503 with Retry-After when it does
not fit), and a chunked body's bytes as they arrive; what a request reserved is freed when it is answered.
Each connection could otherwise hold up to ``APP_MAX_UPLOAD_BYTES`` (16 MiB) before any check, and 220
paused uploads were enough to get the shipped 4 GiB pod killed for its memory.

``AdminGate`` answers an admin route's request with 401/403 before reading a byte of its body, and reads the
body of an allowed one with the ``APP_MAX_JSON_BYTES`` limit (FastAPI would read and parse the whole body
before the route's auth dependency runs: a 200 MiB body sent with no token was held in memory).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import admin_refusal
from app.api.errors import PayloadTooLarge, expected_response
from app.config import Settings
from app.engine.errors import UploadBudgetExceeded
from app.logging import request_id
from app.service_metrics import ServiceMetrics

logger = logging.getLogger("app.access")
error_logger = logging.getLogger("app.errors")
REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = _incoming_id(scope) or uuid.uuid4().hex
        request_id.set(rid)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away (or its body missed APP_BODY_TIMEOUT_S and the server closed the
            # connection): no one is left to answer, and it is no fault of the service.
            status = 499
            logger.info("the client disconnected before it was answered", extra={"path": scope["path"]})
        except Exception:
            error_logger.exception("unhandled error", extra={"path": scope["path"]})
            status = 500
            if not response_started:
                await _plain_500(send, rid)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.latency.labels(template).observe(seconds)
            logger.info("request", extra={"method": scope["method"], "path": scope["path"], "route": template,
                                          "status": status, "ms": round(seconds * 1000, 2)})


def _incoming_id(scope: Scope) -> str | None:
    candidate = _header(scope, REQUEST_ID_HEADER.encode())
    return candidate if candidate is not None and _SANE_ID.match(candidate) else None


async def _plain_500(send: Send, rid: str) -> None:
    body = json.dumps({"detail": f"internal error; it has been logged under request ID {rid}"}).encode()
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": body})


class UploadBudget:
    """Bytes of request bodies held by the requests being read, process-wide (one per app)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> None:
        if self.held + size > self.limit:
            raise UploadBudgetExceeded(
                f"the service is reading {self.held} bytes of uploads already, and may hold "
                f"{self.limit} (APP_MAX_UPLOAD_BYTES_IN_FLIGHT); retry in a moment", UPLOAD_RETRY_AFTER_S)
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


# Uploads in flight are read within APP_BODY_TIMEOUT_S, most in well under a second.
UPLOAD_RETRY_AFTER_S = 2


class UploadBudgetGate:
    """Reserves each request's body in the ``UploadBudget``: its declared length (up to ``max_body``, the
    most a route reads) before the app runs, else each chunk as it arrives."""

    def __init__(self, app: ASGIApp, budget: UploadBudget, max_body: int) -> None:
        self.app = app
        self.budget = budget
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        counting = declared is None or not declared.isdigit()
        held = 0
        started = False

        async def counted() -> Message:
            nonlocal held
            message = await receive()
            if counting and message["type"] == "http.request":
                size = len(message.get("body", b""))
                self.budget.reserve(size)
                held += size
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if not counting:
                size = min(int(declared), self.max_body + 1)  # type: ignore[arg-type]
                self.budget.reserve(size)
                held = size
            await self.app(scope, counted, watched_send)
        except UploadBudgetExceeded as error:
            if started:
                raise
            await expected_response(scope["path"], error)(scope, receive, send)
        finally:
            self.budget.release(held)


class AdminGate:
    """Auth, then a bounded body, for the routes under ``prefixes`` (the admin and training routers')."""

    def __init__(self, app: ASGIApp, settings: Settings, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.settings = settings
        self.prefixes = prefixes

    def guards(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guards(scope["path"]):
            await self.app(scope, receive, send)
            return
        refusal = admin_refusal(self.settings, _header(scope, b"authorization"))
        body = b""
        if refusal is None:
            try:
                body = await _bounded_body(scope, receive, self.settings.max_json_bytes)
            except PayloadTooLarge as error:
                refusal = error
        if refusal is not None:
            await expected_response(scope["path"], refusal)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: an http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _bounded_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _json_too_large(limit)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            raise _json_too_large(limit)
        if not message.get("more_body", False):
            return bytes(body)


def _json_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is over {limit} bytes (APP_MAX_JSON_BYTES); the admin and training "
                           "routes take small JSON objects")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
