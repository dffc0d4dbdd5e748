"""The control plane as a supervised child of a serving process: ``python -m app`` on one machine.

``ControlSupervisor`` runs ``python -m app.control`` on ``127.0.0.1:APP_CONTROL_PORT`` with the serving
process's settings, restarts it whenever it ends (after a backoff that doubles from ``MIN_BACKOFF_S`` up to
``MAX_BACKOFF_S`` while it keeps failing, and starts again from the bottom once a child has run for
``HEALTHY_AFTER_S``), and stops it on shutdown (SIGTERM, so running jobs are marked interrupted, then SIGKILL
after a grace period). It runs on a thread of its own and touches nothing the serving process needs: a control
plane that cannot start (its database unreachable, its port taken) is retried in the background while
``/predict`` answers. The child watches its parent (``--parent-pid``), so a serving process that is killed
outright does not leave it behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from app.config import Settings

logger = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 30.0
# Beside the serving process on one machine, predictions come first: the control plane (and the training
# processes it starts, which inherit this) yields the CPU under contention, from its first instruction, since
# a restart's interpreter start and imports are CPU-seconds of their own (about a second without torch, which
# the control plane does not import: benchmarks/control_start.py). 10 is the usual niceness for background work.
SUPERVISED_NICENESS = 10
STOP_GRACE_S = 30.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding app/, so the child imports this copy


def supervises_control_plane(settings: Settings) -> bool:
    """Whether a serving process starts the control plane itself: on one machine, unless told it runs
    elsewhere (APP_CONTROL_URL) or that none runs here (APP_RUN_JOBS=false)."""
    return settings.control_url is None and settings.run_jobs


def settings_environment(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child process exactly ``settings``: every ``APP_*`` variable of
    ``environ`` replaced by the settings' own values (an in-process ``Settings`` object may not come from the
    environment at all)."""
    base = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.upper().startswith("APP_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        base[f"APP_{name.upper()}"] = text
    base.pop("APP_CONTROL_URL", None)  # the child is the control plane
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), base.get("PYTHONPATH")]))
    return base


class ControlSupervisor:
    def __init__(self, settings: Settings, host: str = "127.0.0.1") -> None:
        self.port = settings.control_port
        self.url = f"http://{host}:{self.port}"
        self._command = [sys.executable, "-m", "app.control", "--host", host, "--port", str(self.port),
                         "--parent-pid", str(os.getpid())]
        self._environment = settings_environment(settings)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.starts = 0  # children started, the first one included
        self.last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="control plane supervisor", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the child (SIGTERM, SIGKILL after ``grace_s``) and do not restart it."""
        self._stopping.set()
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("the control plane did not stop within %.0f s of SIGTERM; killing it", grace_s)
                child.kill()
                child.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._child = subprocess.Popen(self._command, env=self._environment)
                    _lower_priority(self._child.pid)
                except OSError:
                    logger.exception("could not start the control plane")
                    self._child = None
            if self._child is not None:
                self.starts += 1
                logger.info("control plane started on %s (pid %d)", self.url, self._child.pid)
                self.last_exit = self._child.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                backoff = MIN_BACKOFF_S
            logger.error("the control plane on %s ended (status %s); restarting it in %.1f s; predictions are "
                         "not affected", self.url, self.last_exit, backoff)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


def _lower_priority(pid: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + SUPERVISED_NICENESS))
    except OSError:  # it already ended, or lowering is not permitted: it runs at the serving process's priority
        pass
