"""Driving the ASGI app by hand, with a body that looks endless, to see how much of it the app pulls."""

from __future__ import annotations

import json
from typing import Any

CHUNK = 256 * 1024


async def call_with_endless_body(app: Any, path: str, headers: list[tuple[bytes, bytes]], chunks: int,
                                 start: bytes = b"", chunk: int = CHUNK) -> tuple[int, int, dict[str, Any]]:
    """POST ``chunks`` chunks of ``chunk`` bytes (the first beginning with ``start``, no Content-Length) to
    ``path``; return the status, how many body bytes the app pulled, and the JSON of the answer."""
    pulled = 0
    sent = 0
    messages = []

    async def receive():
        nonlocal pulled, sent
        sent += 1
        pulled += chunk
        body = (start if sent == 1 else b"") + b"\0" * chunk
        return {"type": "http.request", "body": body, "more_body": sent < chunks}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"service"), *headers], "client": ("127.0.0.1", 1), "server": ("service", 80)}
    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, pulled, json.loads(body) if body.startswith(b"{") else {}
