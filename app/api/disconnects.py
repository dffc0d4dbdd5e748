"""Work for a client that is gone is dropped: ``unless_disconnected`` runs a request's classification while
it watches the connection, and cancels it the moment the client disconnects.

A cancelled classification never starts the decoding it had not begun, and takes its images that are not yet
computed out of the engine's queue (``InferenceEngine.predict``); the request is logged and counted with
status 499 (``RequestContextMiddleware``). Before this, a client that timed out and retried was still
decoded, queued and computed until its deadline, so under overload the retries doubled the load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled and
    ``ClientDisconnect`` raised. Call it after the body is read (what follows it on the channel is only the
    disconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # this request itself was cancelled
            task.cancel()
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
