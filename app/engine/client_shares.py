"""Each client's share of the inference queue (``APP_MAX_CLIENT_IMAGES``), and who was told to back off.

A client is refused when its images waiting for the device would pass its share; the refusal says to retry
after N seconds. A client that ignores that and sends again within those N seconds is refused before its
body is read (``UploadBudgetGate``'s neighbour in ``app/api/middleware.py`` asks ``backing_off``): without
it, a flood of large batch requests is refused only after each body has been read and every image in it
decoded, and that work alone took the well-behaved clients' p99 from 39 to 307 ms on a 2-core CPU
(``benchmarks/results/faults-20261207T195737Z.json``).
"""

from __future__ import annotations

import time
from collections import OrderedDict

# The most clients remembered as backing off; past it the oldest refusal is forgotten first, so a client
# that sends from many addresses costs bounded memory (and each address still meets its own share).
MAX_REMEMBERED_REFUSALS = 10_000


class ClientShares:
    def __init__(self, max_images: int, clock=time.monotonic) -> None:
        self.max_images = max_images  # images one client may have waiting; 0 = no limit
        self._clock = clock
        self._waiting: dict[str, int] = {}
        self._refused_until: OrderedDict[str, float] = OrderedDict()

    def waiting(self, client: str | None) -> int:
        return self._waiting.get(client, 0) if client is not None else 0

    def over_share(self, client: str | None, count: int) -> bool:
        return bool(self.max_images) and client is not None and self.waiting(client) + count > self.max_images

    def add(self, client: str | None, count: int) -> None:
        if client is not None:
            self._waiting[client] = self._waiting.get(client, 0) + count

    def remove(self, client: str | None, count: int) -> None:
        if client is None:
            return
        left = self._waiting[client] - count
        if left:
            self._waiting[client] = left
        else:
            del self._waiting[client]

    def refused(self, client: str, retry_after_s: float) -> None:
        """``client`` was refused for its share and told to retry after ``retry_after_s``."""
        self._refused_until.pop(client, None)
        self._refused_until[client] = self._clock() + retry_after_s
        while len(self._refused_until) > MAX_REMEMBERED_REFUSALS:
            self._refused_until.popitem(last=False)

    def backing_off(self, client: str | None) -> float:
        """Seconds left of the back-off ``client`` was asked for (0 when none): its requests until then are
        refused before they cost anything."""
        if client is None or not self.max_images:
            return 0.0
        until = self._refused_until.get(client)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._refused_until[client]
            return 0.0
        return left

    def __bool__(self) -> bool:
        """Whether any client has images waiting."""
        return bool(self._waiting)
