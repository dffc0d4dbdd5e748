"""Per-request context, as a plain ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path).

For every HTTP request it: takes the client's ``X-Request-ID`` when it is a sane token (else makes one) and
returns it on the response; puts it in the logging context; counts the request and times it by route
template (``/predict``, not the raw path, so metrics stay bounded); writes one JSON access-log line; and
answers any unhandled exception with a plain JSON 500, logged with its traceback, so no input can surface
a stack trace or take the process down.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SANE_ID.match(candidate) else None
    return None


async def _plain_500(send: Send, rid: str) -> None:
    body = json.dumps({"detail": f"internal error; it has been logged under request ID {rid}"}).encode()
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": body})
