"""Who sent a request, for ``APP_MAX_CLIENT_IMAGES``, and the gate that turns away a client that was told to
back off before its body is read.

A client is named by ``APP_CLIENT_ID_HEADER`` when that is set and present (behind a proxy every request
comes from the proxy's address), else by its peer address. The engine keeps each client's share
(``app/engine/client_shares.py``); ``ClientBackoffGate`` asks it, at the request's first byte, whether this
client was refused for its share within the Retry-After it was given, and answers 503 at once if so.
"""

from __future__ import annotations

import math

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import expected_response
from app.config import Settings
from app.engine.errors import QueueFull

MAX_CLIENT_ID_LENGTH = 256  # a header value can be 8 KiB; the share table holds no more than this per client
# The routes whose images count against a client's share (those that pass ``client`` to the engine).
SHARED_ROUTES = frozenset({"/predict", "/predict/batch"})


def client_id(header_value: str | None, peer: str | None, settings: Settings) -> str | None:
    """The client's name for its share; None when there is no per-client limit to apply."""
    if not settings.max_client_images:
        return None
    if settings.client_id_header and header_value:
        return header_value[:MAX_CLIENT_ID_LENGTH]
    return peer


class ClientBackoffGate:
    """Refuses, before a byte of the body is read, a prediction request from a client still inside the
    Retry-After of its last refusal for its share (``ClientShares.backing_off``)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.header = settings.client_id_header.lower().encode() if settings.client_id_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.settings.max_client_images or scope["method"] != "POST"
                or scope["path"] not in SHARED_ROUTES):
            await self.app(scope, receive, send)
            return
        engine = getattr(scope["app"].state, "engine", None)
        client = client_id(self._named(scope), scope["client"][0] if scope.get("client") else None, self.settings)
        left = engine.client_shares.backing_off(client) if engine is not None else 0.0
        if not left:
            await self.app(scope, receive, send)
            return
        retry_after = math.ceil(left)
        refusal = QueueFull(f"this client was refused for its share of the queue (APP_MAX_CLIENT_IMAGES="
                            f"{self.settings.max_client_images}) and asked to wait; retry after {retry_after} s",
                            retry_after)
        await expected_response(scope["path"], refusal)(scope, receive, send)

    def _named(self, scope: Scope) -> str | None:
        if self.header is None:
            return None
        for name, value in scope["headers"]:
            if name == self.header:
                return value.decode("latin-1")
        return None
