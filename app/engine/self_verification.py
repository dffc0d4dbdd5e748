"""The service verifies its own CPU backends on the machine it runs on, and serves the winner (issue 23).

A checkpoint's ``backends-cpu.json`` holds for the machine that measured it. Anywhere else (another CPU,
the same CPU under an ISA mask, another torch) the service starts on the exact float32 backend at once, and
this module measures every backend in the background, in a child process at the lowest CPU priority
(``app.engine.verification_child``: outside this process's GIL), on the labelled verification set that ships
with the checkpoint (its holdout images; never the test set), with ``training.verify_backends``' rules. The
report is kept in ``APP_STATE_DIR/backend-reports`` (``app.engine.report_cache``, keyed by the weights'
SHA-256, the masked CPU features and the library versions), and the checkpoint is swapped in again
(``InferenceEngine.swap``), which chooses the fastest backend within ``APP_MAX_ACCURACY_DROP`` of float32
by that report (``app.engine.backend_choice``). A restart on the same machine finds the report and serves
the winner from the start.

Nothing is measured when ``APP_CPU_BACKEND`` pins a backend, on CUDA (``APP_CUDA_PRECISION`` and
``backends-cuda.json`` decide there), or when the checkpoint's own report was measured on a machine with
this one's identity. ``GET /model`` shows the phase (``status``, ``app.engine.verification_status``):
``waiting`` for a model, ``verifying``, ``verified`` (with the figures and where they come from),
``kept_reference`` (and why), ``pinned`` or ``not_applicable``. With several workers, one measures while the
others wait for its report (a lock file).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch

import app
from app.engine.backend_choice import AUTO
from app.engine.engine import InferenceEngine
from app.engine.report_cache import CACHE_FOLDER, cache_key, load_cached_report, save_cached_report
from app.engine.served_model import ServedModel
from app.engine.verification_status import BackendVerificationStatus, Phase, VerifiedBackend
from model.backend_report import (
    BATCH_SIZES,
    BackendChoice,
    BackendReport,
    BackendReportError,
    choose_backend,
    load_backend_report,
    machine_identity,
)
from model.card import VERIFICATION_FILE
from model.cpu_features import isa_mask
from model.inference import available_cpu_backends

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often the follower looks for a newly served checkpoint
SECONDS_PER_TIMING = 0.5  # per backend, batch size and round: three rounds of 1/16/64 over five backends ~ 25 s
ROUNDS = 3  # interleaved timing rounds, the median kept: a burst of requests slows every backend alike


class BackendVerification:
    """Follows the served checkpoint and verifies the CPU backends of each one; ``close()`` stops it."""

    def __init__(self, engine: InferenceEngine, cache_dir: Path, *, pinned: str | None = None,
                 poll_s: float = POLL_S, seconds_per_timing: float = SECONDS_PER_TIMING, rounds: int = ROUNDS) -> None:
        self.engine = engine
        self.cache_dir = cache_dir
        self.pinned = pinned
        self.poll_s = poll_s
        self.seconds_per_timing, self.rounds = seconds_per_timing, rounds
        self.machine = machine_identity("cpu")  # the masks are read once, as torch and oneDNN read them
        self._current = self._status("waiting", "no model is served yet")
        self._settled: tuple[Path | None, str] | None = None  # the checkpoint _current is about
        self._report: BackendReport | None = None  # the report that holds for it, if one does
        self._child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> BackendVerificationStatus:
        """The phase for the checkpoint served now; settled on the spot (a file or two read) when the model
        changed since the follower last looked, so /model never describes the previous checkpoint."""
        served = self.engine.model
        if served is not None and _key(served) != self._settled:
            self._settle(served)
        return self._current

    def start(self) -> None:
        # Before the first model loads: its backend choice then already finds a report this service measured.
        self.engine.backend_policy = replace(self.engine.backend_policy, report_cache=self.cache_dir)
        self._task = asyncio.create_task(self._follow(), name="backend-verification")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_child()

    # -- following the served model ------------------------------------------------------------------------

    async def _follow(self) -> None:
        handled: tuple[Path | None, str] | None = None
        while True:
            served = self.engine.model
            if served is not None and _key(served) != handled:
                handled = _key(served)
                try:
                    await self._verify(served)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # verification is an optimisation: the reference keeps serving
                    logger.error("backend verification failed", exc_info=True)
                    self._current = self._status("kept_reference", f"the verification failed "
                                                                   f"({type(error).__name__}: {error}); "
                                                                   f"{served.backend} keeps serving")
            await asyncio.sleep(self.poll_s)

    def _settle(self, served: ServedModel) -> None:
        """Everything decided without measuring: not needed, pinned, a report that holds, or no set to
        measure on; else ``verifying``, and ``self._report`` stays None."""
        self._settled, self._report = _key(served), None
        if served.device.type != "cpu":
            self._current = self._status("not_applicable", "on CUDA the precision follows APP_CUDA_PRECISION and "
                                                           "the checkpoint's backends-cuda.json")
            return
        if self.pinned is not None:
            self._current = self._status("pinned", f"APP_CPU_BACKEND={self.pinned} pins the backend; nothing is "
                                                   "measured")
            return
        assert served.path is not None  # ServedModel.load sets it
        sha = served.card.weights_sha256
        try:
            self._report = load_backend_report(served.path, weights_sha256=sha, machine=self.machine)
            self._verified(self._report, "checkpoint", served.backend, None)
            return
        except BackendReportError:
            pass
        self._report = load_cached_report(self.cache_dir, sha, self.machine)
        if self._report is not None:
            self._verified(self._report, "cache", served.backend, None)
        elif not (served.path / VERIFICATION_FILE).is_file():
            self._current = self._status(
                "kept_reference", f"the checkpoint has no verification set ({VERIFICATION_FILE}: write it with "
                                  f"`python -m training.verify_backends`), so nothing can be measured here; "
                                  f"{served.backend} keeps serving")
        else:
            self._current = self._status("verifying", f"measuring every CPU backend against float32 on the "
                                                      f"checkpoint's verification set; {served.backend} serves "
                                                      f"meanwhile", started_at=datetime.now(UTC))

    async def _verify(self, served: ServedModel) -> None:
        self._settle(served)
        if self._report is not None:
            await self._serve_the_winner(served, self._report)
            return
        if self._current.phase != "verifying":
            return
        assert served.path is not None
        started, started_at = time.perf_counter(), self._current.started_at
        sha = served.card.weights_sha256
        with self._lock(cache_key(sha, self.machine)) as lock:
            await self._acquire(lock)
            report = load_cached_report(self.cache_dir, sha, self.machine)  # another worker may have measured it
            source: Literal["cache", "measured"] = "cache"
            if report is None:
                report, problem = await self._measure(served.path)
                if report is None:
                    self._current = self._status("kept_reference", f"{problem}; {served.backend} keeps serving",
                                                 started_at=started_at)
                    return
                save_cached_report(self.cache_dir, report)
                source = "measured"
        if self.engine.model is None or _key(self.engine.model) != _key(served):
            return  # another checkpoint took over meanwhile: the report is kept, the follower turns to the new one
        self._report = report
        self._verified(report, source, served.backend, started_at, time.perf_counter() - started)
        await self._serve_the_winner(served, report)

    async def _serve_the_winner(self, served: ServedModel, report: BackendReport) -> None:
        """Swap the checkpoint in again if the report chooses another backend and it is still the one served."""
        chosen = self._choice(report).backend
        current = self.engine.model
        if chosen == served.backend or current is not served:
            return
        logger.info("self-verification chose %s over %s; swapping it in", chosen, served.backend)
        assert served.path is not None
        await self.engine.swap(served.path, origin=served.origin)
        now_serving = self.engine.model.backend if self.engine.model is not None else None
        if now_serving != chosen:
            self._current = self._current.model_copy(update={
                "phase": "kept_reference",
                "summary": f"the verification chose {chosen}, but {now_serving} serves: "
                          f"{self.engine.model.backend_reason if self.engine.model else 'no model'}"})

    # -- the child process ---------------------------------------------------------------------------------

    async def _measure(self, weights: Path) -> tuple[BackendReport | None, str]:
        sizes = sorted({*BATCH_SIZES, self.engine.max_batch_size})
        command = [sys.executable, "-m", "app.engine.verification_child", "--weights", str(weights),
                   "--passes", str(self.engine.parallel_batches), "--threads", str(torch.get_num_threads()),
                   "--batch-sizes", *map(str, sizes), "--seconds", str(self.seconds_per_timing),
                   "--rounds", str(self.rounds)]
        # The child imports this very code, wherever the service was started from.
        package_root = str(Path(app.__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment)
        stderr_lines: list[str] = []
        assert self._child.stdout is not None and self._child.stderr is not None
        progress = asyncio.create_task(self._relay(self._child.stderr, stderr_lines))
        output = await self._child.stdout.read()
        await progress
        code = await self._child.wait()
        self._child = None
        if code != 0:
            why = next((line for line in reversed(stderr_lines) if line.startswith("error:")),
                       stderr_lines[-1] if stderr_lines else f"exit status {code}")
            return None, f"the backends could not be measured here ({why.removeprefix('error: ')})"
        return BackendReport.model_validate(json.loads(output)), ""

    async def _relay(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            logger.info("self-verification: %s", line)
            if self._current.phase == "verifying":
                self._current = self._current.model_copy(update={"summary": f"measuring: {line}"})

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            child.terminate()
            with contextlib.suppress(ProcessLookupError):
                await child.wait()

    # -- several workers, one measurement ------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, key: str):
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{key}.lock", "a+") as handle:
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    async def _acquire(self, handle) -> None:
        """The lock, waited for without blocking the event loop (a blocked thread would outlive shutdown)."""
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self._current = self._current.model_copy(update={"summary": "another worker of this service is "
                                                                       "measuring; waiting for its report"})
                await asyncio.sleep(self.poll_s)

    # -- what /model says ----------------------------------------------------------------------------------

    def _choice(self, report: BackendReport) -> BackendChoice:
        """What ``app.engine.backend_choice`` chooses by ``report`` for the engine's next swap."""
        policy = self.engine.backend_policy
        available = set(available_cpu_backends()[0])
        if report.calibration_sha256 is None:
            available.discard("int8")
        return choose_backend(report, max_drop_points=policy.max_accuracy_drop,
                              batch_size=self.engine.max_batch_size, available=available)

    def _verified(self, report: BackendReport, source: Literal["checkpoint", "cache", "measured"], serving: str,
                  started_at: datetime | None, seconds: float | None = None) -> None:
        floor = report.reference_measurement.accuracy - self.engine.backend_policy.max_accuracy_drop / 100
        chosen = self._choice(report).backend
        where = {"checkpoint": "the checkpoint's report, measured on a machine with this identity",
                 "cache": "this service's earlier measurement on this machine",
                 "measured": f"its measurement here, in {seconds or 0:.0f} s"}[source]
        self._current = self._status(
            "verified", f"{chosen} is the fastest backend within {self.engine.backend_policy.max_accuracy_drop:g} "
                        f"points of float32 on {report.test_images} {report.image_set} images, by {where}",
            source=source, image_set=report.image_set, images=report.test_images, chosen=chosen,
            skipped=dict(report.skipped), started_at=started_at, seconds=None if seconds is None else round(seconds, 1),
            backends=[VerifiedBackend(backend=row.backend, accuracy=row.accuracy, agreement=row.agreement,
                                      max_probability_diff=row.max_probability_diff, max_logit_diff=row.max_logit_diff,
                                      images_per_s=row.images_per_s, within_drop=row.accuracy >= floor - 1e-8)
                      for row in report.backends])
        logger.info("backend verification: %s (serving %s)", self._current.summary, serving)

    def _status(self, phase: Phase, summary: str, **figures) -> BackendVerificationStatus:
        return BackendVerificationStatus(phase=phase, summary=summary, features=list(self.machine.features),
                                         isa_mask=isa_mask(), **figures)


def _key(served: ServedModel) -> tuple[Path | None, str]:
    return served.path, served.card.weights_sha256


def start_backend_verification(engine: InferenceEngine, state_dir: Path, cpu_backend: str) -> BackendVerification:
    """Start following the engine's served checkpoint; call before its first model loads."""
    verification = BackendVerification(engine, state_dir / CACHE_FOLDER,
                                       pinned=None if cpu_backend == AUTO else cpu_backend)
    verification.start()
    return verification
