"""The registry follower: how a serving replica learns which model to serve. It only reads the registry.

The registry (``versions/<version>/`` folders and the ``current`` pointer, ``app/control/registry.py``) is the
one contract between the control plane, which writes it, and the serving replicas, which read it. A replica
reads the pointer every ``APP_REGISTRY_POLL_S`` and swaps in the version it names.

A read that fails (EIO or ESTALE from a shared volume, a pointer that is not UTF-8, permission denied, a
directory where the file was) never stops the replica: it keeps serving the model it has, reports the error
in ``/readyz``'s ``registry_error`` and the ``registry_read_errors_total`` metric, and tries again with
exponential backoff (from the poll interval up to ``MAX_BACKOFF_S``) until a read succeeds. Before, any such
error made the replica SIGTERM itself; on a shared volume every replica stopped together, and a lasting
fault was a crash loop (issue 22).

Reads run on a worker thread: a hung network file system blocks that thread, never the event loop that
answers ``/predict``.

The one thing a replica writes there is a small record of which version it serves (``record_serving``, on
every change and every ``SERVING_MAX_AGE_S / 3``), so that the control plane's retention never deletes a
version some replica still serves or falls back to. Failing to write it is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from app.control.promotion import HotSwappable
from app.control.registry import SERVING_MAX_AGE_S, ModelRegistry

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class RegistryMetrics:
    """The follower's metrics, on the service's own Prometheus registry (``ServiceMetrics.registry``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.read_errors = Counter("registry_read_errors_total", "failed reads of the model registry's pointer, "
                                   "by error", ["error"], registry=registry)
        self.readable = Gauge("registry_readable", "1 when the last read of the registry's pointer succeeded, "
                              "else 0 (the replica keeps serving its model and retries)", registry=registry)
        self.readable.set(1)


def error_name(error: BaseException) -> str:
    """A short, bounded label for an error: the errno's name (EIO, ESTALE, EISDIR) or the exception's class."""
    number = getattr(error, "errno", None)
    if isinstance(number, int) and number in errno.errorcode:
        return errno.errorcode[number]
    return type(error).__name__


def replica_id() -> str:
    """This process's name in the registry's serving records: host and PID, in the characters they allow."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")


class RegistryFollower:
    """Serves the version the registry's pointer names; ``check()`` once, or ``start()`` to poll."""

    def __init__(self, root: Path, engine: HotSwappable, interval_s: float, metrics: RegistryMetrics,
                 open_registry: Callable[[Path], ModelRegistry] = ModelRegistry) -> None:
        self.root = root
        self.engine = engine
        self.interval_s = interval_s
        self.metrics = metrics
        self.error: str | None = None  # why the last read failed, for /readyz; None after a good read
        self.failures = 0  # reads failed in a row
        self._seen: str | None = None  # the pointer's value last acted on
        self._open = open_registry
        self._registry: ModelRegistry | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.replica_id = replica_id()
        self._recorded: tuple[str | None, float] | None = None  # the version last recorded as served, and when

    def registry(self) -> ModelRegistry:
        """The registry, opened on first use (raises ``OSError`` while its folder cannot be created)."""
        if self._registry is None:
            self._registry = self._open(self.root)
        return self._registry

    def note_start_up(self) -> None:
        """Remember the pointer as start-up found it: ``initial_model`` served it, or fell back from it, so
        the follower acts only on a later change. A read error is reported like any other."""
        try:
            self._seen = self.registry().current()
        except Exception as error:
            self._read_failed(error)

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._poll(), name="registry follower")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def next_delay_s(self) -> float:
        """The poll interval, doubled for each read failed in a row, at most ``MAX_BACKOFF_S`` (or the interval,
        when that is longer)."""
        if self.failures == 0:
            return self.interval_s
        return min(self.interval_s * 2 ** self.failures, max(MAX_BACKOFF_S, self.interval_s))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.next_delay_s())
            await self.check()

    async def check(self) -> None:
        """Read the pointer once and serve the version it names if it changed; never raises (but cancellation)."""
        async with self._lock:
            try:
                current = await asyncio.to_thread(lambda: self.registry().current())
            except Exception as error:  # any read error: report, keep serving, retry later
                self._read_failed(error)
                return
            if self.error is not None:
                logger.warning("the registry's pointer is readable again (after %d failed reads)", self.failures)
            self.error, self.failures = None, 0
            self.metrics.readable.set(1)
            await self._serve(current)
            await self._record_serving()

    async def _record_serving(self) -> None:
        """Tell retention which version this replica serves: on a change, and before the record goes stale."""
        serving = self.engine.card.version if self.engine.card is not None else None
        now = time.monotonic()
        if self._recorded is not None and self._recorded[0] == serving and \
                now - self._recorded[1] < SERVING_MAX_AGE_S / 3:
            return
        try:
            await asyncio.to_thread(self.registry().record_serving, self.replica_id, serving)
            self._recorded = (serving, now)
        except Exception as error:  # retention then spares only what other records and the pointers name
            logger.warning("could not record in the registry that this replica serves %s: %s", serving, error)

    def _read_failed(self, error: Exception) -> None:
        self.failures += 1
        self.metrics.read_errors.labels(error=error_name(error)).inc()
        self.metrics.readable.set(0)
        serving = self.engine.card.version if self.engine.card is not None else None
        self.error = (f"the registry's pointer under {self.root} could not be read ({error_name(error)}: "
                      f"{error}); still serving {serving}, retrying in {self.next_delay_s():.1f} s")
        log = logger.error if self.failures == 1 else logger.debug
        log(self.error)

    async def _serve(self, current: str | None) -> None:
        serving = self.engine.card.version if self.engine.card is not None else None
        if current is None or current == self._seen or current == serving:
            self._seen = current
            return
        self._seen = current  # one try per pointer change: a version that fails to load is not retried in a loop
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.registry().path, current)
            await self.engine.swap(path, origin=f"registry version {current}, the registry's current")
            logger.info("now serving %s, named by the registry (%.1f s)", current, time.perf_counter() - started)
        except Exception:
            logger.exception("could not serve %s, which the registry names as current; still serving %s until "
                             "the pointer changes again", current, serving)
