"""Waiting for a condition, with a deadline, instead of sleeping a fixed time: load on the shared 2-core
machine makes any fixed sleep too short on a bad minute and needlessly long on a good one."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Long on purpose: a deadline only stops a wait that would never end, and the condition ends every other wait
# the moment it holds. On the shared machine, under load, importing torch alone has taken minutes.
DEADLINE_S = 600.0


def wait_until(condition: Callable[[], T], timeout_s: float = DEADLINE_S, what: str = "the condition",
               every_s: float = 0.05) -> T:
    """Call ``condition()`` until it returns something truthy, and return that; fail naming ``what`` once
    ``timeout_s`` has passed. ``condition`` may itself fail (an assertion) to stop the wait early."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)
    return value


async def eventually(condition: Callable[[], Any | Awaitable[Any]], timeout_s: float = DEADLINE_S,
                     what: str = "the condition", every_s: float = 0.01) -> Any:
    """``wait_until`` for coroutines: the event loop keeps running while it waits, and ``condition`` may be
    a coroutine function (one that sends a request, say)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)
