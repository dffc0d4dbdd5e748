"""How admin writes reach the control plane from a serving replica: a thin forward over HTTP.

A serving replica does not run jobs or write the registry (docs/design.md, "Two planes"). The routes that do,
the job API (``/train`` and under it) and ``POST /admin/promote/{version}``, are served by the control plane's
own process (``app/control/service.py``). ``ControlForward`` passes those requests on to it unchanged, so
clients keep one address: after ``AdminGate`` has checked the token and bounded the body (an unauthenticated
body is never read, let alone forwarded), the request goes to ``APP_CONTROL_URL`` (or the control process this
replica supervises) and the answer streams back. The forward's costs are bounded: the body by
``APP_MAX_JSON_BYTES`` (already read by ``AdminGate``), the connections to the control plane by
``MAX_CONNECTIONS``, and each step by ``TIMEOUTS``. When the control plane cannot be reached the client gets
503 with ``Retry-After``; nothing else on the replica notices.

After a promotion forwarded through it succeeds, the replica reads the registry's pointer at once and serves
the promoted version before answering, so ``POST /admin/promote`` on a one-machine install still answers
once the new model serves; other replicas follow within ``APP_REGISTRY_POLL_S``.

``ControlLink`` also asks the control plane's ``/healthz`` every ``PROBE_INTERVAL_S`` what it is (for this
replica's ``/healthz`` and ``/readyz``); the answer is informational and never fails them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import expected_response
from app.control.plane import JobsNotRunHere
from app.logging import request_id

logger = logging.getLogger(__name__)

PROMOTION_PREFIX = "/admin/promote"
# connect: the control plane is on the same host or network; read: the slowest answer is POST /train (the job
# runner starts a process) and a promotion (the weights' SHA-256 is verified), seconds on a CPU.
TIMEOUTS = httpx.Timeout(connect=3.0, read=60.0, write=10.0, pool=5.0)
MAX_CONNECTIONS = 16
PROBE_INTERVAL_S = 5.0  # each probe is a line in the control plane's access log
RETRY_AFTER_S = 2
# How long after start-up a refused connection is retried rather than answered with 503: the control plane
# starts beside the replica and takes seconds to import and open its store; nothing was sent, so a retry is safe.
START_UP_GRACE_S = 60.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those the forward sets itself.
_NOT_FORWARDED = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
                  b"transfer-encoding", b"upgrade", b"host", b"content-length", b"x-request-id"}


class ControlUnreachable(JobsNotRunHere):
    """The control plane did not answer: a 503, with Retry-After."""


class ControlLink:
    """Where this replica's control plane is, a client to it, and what it last said about itself."""

    def __init__(self, url: str | None, unavailable: str) -> None:
        self.url = url.rstrip("/") if url else None
        self.unavailable = unavailable  # the 503's message while there is no control plane to forward to
        self.state = "starting" if self.url else "off"
        self.job_runner = "unknown" if self.url else "off"
        self.on_promoted: Callable[[], Awaitable[None]] | None = None
        self.client: httpx.AsyncClient | None = None
        self._probe: asyncio.Task[None] | None = None
        self._opened = time.monotonic()

    def open(self) -> None:
        if self.url is None:
            return
        self._opened = time.monotonic()
        self.client = httpx.AsyncClient(timeout=TIMEOUTS, limits=httpx.Limits(max_connections=MAX_CONNECTIONS))
        self._probe = asyncio.create_task(self._probe_forever(), name="control plane probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    async def probe(self) -> None:
        """Ask the control plane's /healthz what it is; any failure only changes ``state``."""
        if self.client is None:
            return
        try:
            response = await self.client.get(f"{self.url}/healthz", timeout=PROBE_INTERVAL_S)
            response.raise_for_status()
            self.job_runner = str(response.json().get("job_runner", "unknown"))
            self.state = "ready"
        except (httpx.HTTPError, ValueError) as error:
            self.job_runner = "unknown"
            never = self.state.startswith("starting")
            self.state = f"{'starting' if never else 'unreachable'} (not answering: {type(error).__name__})"

    def starting(self) -> bool:
        """Whether the control plane has never answered yet and start-up is recent."""
        return self.state.startswith("starting") and time.monotonic() - self._opened < START_UP_GRACE_S

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, retrying a refused connection while the control plane is starting, and a reset one
        too if the request only reads."""
        assert self.client is not None
        while True:
            try:
                return await self.client.send(request, stream=True)
            except httpx.ConnectError:
                if not self.starting():
                    raise
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A predecessor killed on the same port still accepts connections until the kernel has torn down
                # its memory and only then closes its sockets, resetting them unanswered. Whether a write reached
                # it cannot be known, so only a read is sent again.
                if not (self.starting() and request.method in IDEMPOTENT_METHODS):
                    raise
            await asyncio.sleep(0.25)

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(PROBE_INTERVAL_S)


class ControlForward:
    """ASGI middleware: a request that one of the control plane's ``routes`` matches, method included, goes to
    the control plane; any other (a wrong method gets its 405, an unknown path its 404) to ``app``."""

    def __init__(self, app: ASGIApp, link: ControlLink, routes: list[BaseRoute], max_body_bytes: int) -> None:
        self.app = app
        self.link = link
        self.routes = routes
        self.max_body_bytes = max_body_bytes

    def route(self, scope: Scope) -> BaseRoute | None:
        return next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        template: str = getattr(route, "path", None) or scope["path"]
        scope["route"] = route  # the request context labels the metrics and access log with its template
        client = self.link.client
        if self.link.url is None or client is None:
            await expected_response(scope["path"], JobsNotRunHere(self.link.unavailable))(scope, receive, send)
            return
        body = await _body(receive, self.max_body_bytes)
        query = scope.get("query_string", b"").decode("latin-1")
        # The path as the client sent it, still percent-encoded: the decoded one may hold control characters.
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        url = f"{self.link.url}{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED]
        if (rid := request_id.get()) is not None:
            headers.append((b"x-request-id", rid.encode()))
        request = client.build_request(scope["method"], url, content=body, headers=headers)
        try:
            response = await self.link.send(request)
        except httpx.TransportError as error:
            await _unreachable(scope, receive, send, f"{type(error).__name__}: {error}")
            return
        try:
            if template.startswith(PROMOTION_PREFIX) and response.is_success:
                await self._serve_promoted()
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in
                                    _NOT_FORWARDED - {b"content-length"}]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _serve_promoted(self) -> None:
        if self.link.on_promoted is None:
            return
        try:
            await self.link.on_promoted()
        except Exception:  # the pointer moved; this replica follows at its next poll
            logger.exception("serving the promoted version at once failed; the registry follower retries")


async def _body(receive: Receive, limit: int) -> bytes:
    """The request's body; ``AdminGate`` has already refused one over ``limit``, this only makes sure."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError(f"a forwarded body over {limit} bytes got past AdminGate")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _unreachable(scope: Scope, receive: Receive, send: Send, why: str) -> None:
    logger.warning("the control plane did not answer %s %s: %s", scope["method"], scope["path"], why)
    error = ControlUnreachable("the control plane (training jobs, promotion) cannot be reached right now; "
                               f"retry in a few seconds. Predictions are not affected. ({why.split(':')[0]})")
    response = expected_response(scope["path"], error)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    await response(scope, receive, send)
