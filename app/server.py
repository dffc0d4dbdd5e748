"""The HTTP server's limits: what one connection may cost before the app sees a request (``python -m app``).

uvicorn bounds neither the time a client takes to send a request's head or body nor, with httptools, the
head's size: a connection that never finishes its headers stayed open for good, and a 16 MiB header cost
1.2 s of CPU on the event loop. ``LimitedHttpToolsProtocol`` is uvicorn's httptools protocol with three more
rules, from ``APP_*`` settings:

- the head (request line and headers) must arrive within ``APP_HEADER_TIMEOUT_S`` of its first byte (of the
  connection's start, for a connection's first request), else the connection is closed (with a 408 when
  part of a request came);
- the head must fit in ``APP_MAX_HEADER_BYTES``, else 431 and the connection is closed;
- the body must arrive within ``APP_BODY_TIMEOUT_S`` of the end of the head, else the connection is closed
  (the app sees the client disconnect);
- a body the app answered before reading it (a refusal: over the upload budget, a client backing off, no
  admin token) is read and dropped only if at most ``MAX_DRAINED_BODY_BYTES`` of it are still to come, so
  the connection can serve the client's next request. uvicorn read and dropped any amount, on the event
  loop (``benchmarks/faults.py``'s held uploads refuse 183 uploads of 15 MiB; benchmarks/README.md has the
  p99 with and without this rule). A larger rest is not read: the server half-closes (the client reads the
  answer, then the end of the stream), stops reading, and closes ``LINGER_S`` later. Closing at once would
  reset the connection under a client still sending, which can lose it the answer; Go's net/http does the
  same, with the same two figures.

``server_options`` adds uvicorn's own: ``limit_concurrency`` (503 past ``APP_MAX_CONNECTIONS``) and the
keep-alive timeout. ``uvicorn app.main:app`` run by hand gets uvicorn's defaults instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings

logger = logging.getLogger(__name__)
PROTOCOL = f"{__name__}:LimitedHttpToolsProtocol"
MAX_DRAINED_BODY_BYTES = 256 * 1024  # a refused batch upload of small PNGs keeps its connection
LINGER_S = 0.5  # for the answer and the end of the stream to reach a client that is still sending


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run's keyword arguments for the limits above."""
    return {
        "http": PROTOCOL,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # the same limit, should h11 be chosen
    }


@functools.cache
def _settings() -> Settings:
    """This process's settings, read once: uvicorn makes one protocol per connection, and passes it uvicorn's
    own configuration only."""
    return Settings()


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _settings()
        self.max_head_bytes = settings.max_header_bytes
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = "head"  # what of the current request is arriving: "head", "body" or None
        self._head_bytes = 0  # received while the head is incomplete
        self._parsed_head_bytes = 0  # of the request line and headers parsed, for a head that came in one read
        self._head_too_large = False
        self._body_declared: int | None = None  # the request's Content-Length; None when chunked
        self._body_received = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        # Counted per read (at most a few hundred KiB), so an oversized head costs one read's parsing.
        if self._reading == "head" and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # stops the parser; uvicorn answers a parser error with send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self._parsed_head_bytes = 0
        self._body_declared, self._body_received = None, 0
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request: its head's clock starts now
            self._arm(self.header_timeout_s, "head")

    def on_headers_complete(self) -> None:
        self._reading = "body"
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                self._body_declared = int(value)
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_received += len(body)
        super().on_body(body)

    def on_response_complete(self) -> None:
        unread = None if self._body_declared is None else self._body_declared - self._body_received
        if self._reading != "body" or self.transport.is_closing() or (
                unread is not None and unread <= MAX_DRAINED_BODY_BYTES):
            super().on_response_complete()
            return
        self.server_state.total_requests += 1
        self._disarm()
        self._reading = None
        self.transport.pause_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading, self._head_bytes = "head", 0  # what comes next is the next request's head
        super().on_message_complete()


    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        setting = "APP_HEADER_TIMEOUT_S" if part == "head" else "APP_BODY_TIMEOUT_S"
        seconds = self.header_timeout_s if part == "head" else self.body_timeout_s
        logger.info("closing a connection whose request %s did not arrive within %g s (%s)", part, seconds, setting)
        if part == "head" and self._head_bytes:
            self._refuse(408, f"the request head did not arrive within {seconds:g} s ({setting})")
        else:
            self.transport.close()  # a body's app is waiting on it: it sees the client disconnect

    def _refuse_head(self) -> None:
        self._refuse(431, f"the request head is over {self.max_head_bytes} bytes (APP_MAX_HEADER_BYTES)")

    def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n", body,
        ]))
        self.transport.close()
