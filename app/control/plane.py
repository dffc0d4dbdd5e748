"""The control plane as the service holds it for one lifespan: job store, registry, promoter and runner.

Built in the app's lifespan (``open_control_plane``) and closed there (``close``); the routes reach it
through ``app/api/deps.py``. This module wires the others together and is the only one that imports all
of them (``app/control/__init__.py`` draws the arrows).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import SHIPPED_WEIGHTS, Settings
from app.control import retention
from app.control.jobs.progress import tail_lines
from app.control.jobs.runner import Conclusion, JobRunner, TrainingCommand
from app.control.jobs.schemas import Job
from app.control.jobs.store import JobStore, UnknownJob, open_job_store
from app.control.promotion import HotSwappable, ModelPromoter
from app.control.registry import ModelRegistry, UnknownVersion
from model.checkpoint import CARD_FILE, CheckpointError, read_card
from training.layout import LOG_FILE

logger = logging.getLogger(__name__)

RUNS_FOLDER = "runs"


class JobsNotRunHere(Exception):
    """This replica has APP_RUN_JOBS=false; the message names the replica that runs jobs."""


@dataclass
class ControlPlane:
    store: JobStore
    registry: ModelRegistry
    promoter: ModelPromoter
    runner: JobRunner | None
    runs_dir: Path
    jobs_url: str | None = None
    # What stops this process when a background task dies: SIGTERM, so uvicorn shuts down gracefully (jobs
    # marked interrupted) and then re-raises it, so the process ends killed by SIGTERM (status 143 in a
    # shell, non-zero for a supervisor to restart), rather than serving on with a replica that silently
    # stopped following the registry. Tests replace it.
    stop_process: Callable[[], None] = field(default=lambda: signal.raise_signal(signal.SIGTERM))
    failure: str | None = None
    _follower: asyncio.Task[None] | None = None

    def job(self, job_id: str) -> Job:
        """The job's record, from the shared database, so any replica can show it; raises ``UnknownJob``."""
        job = self.store.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def logs(self, job_id: str, tail: int | None = None) -> str:
        """The job's log; read from the shared state directory, so any replica can show it."""
        self.job(job_id)
        return tail_lines(self.runs_dir / job_id / LOG_FILE, tail)

    @property
    def job_runner(self) -> str:
        """This process's part in running jobs, as /healthz shows it: ``runner`` (elected), ``standby`` (may
        run jobs, another process does) or ``off`` (APP_RUN_JOBS=false)."""
        return self.runner.role if self.runner is not None else "off"

    def require_runner(self) -> JobRunner:
        if self.runner is None:
            where = self.jobs_url or "the one replica started with APP_RUN_JOBS=true"
            raise JobsNotRunHere(f"this replica does not run training jobs (APP_RUN_JOBS=false); send training "
                                 f"requests to {where}")
        return self.runner

    def follow_registry(self, engine: HotSwappable, interval_s: float) -> None:
        """Serve whatever version the registry's pointer names, checking every ``interval_s``: a promotion made
        by another replica sharing the registry reaches this one too."""
        if interval_s > 0:
            self._follower = asyncio.create_task(_follow(self.registry, engine, interval_s),
                                                 name="registry follower")
            self._follower.add_done_callback(self._stop_if_failed)

    def _stop_if_failed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.failure = f"the {task.get_name()} failed: {task.exception()!r}"
        logger.critical("%s; stopping the service so that it is restarted", self.failure,
                        exc_info=task.exception())
        self.stop_process()

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self.runner is not None:
            await self.runner.shutdown()
        self.store.close()


async def open_control_plane(settings: Settings, engine: HotSwappable) -> ControlPlane:
    """Open the job store and the registry; with APP_RUN_JOBS, stand for election as the job runner. The
    elected process first stops and marks ``interrupted`` any job an earlier runner left running."""
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    store = await asyncio.to_thread(open_job_store, url, settings.state_dir)
    registry = ModelRegistry(settings.registry_path)
    promoter = ModelPromoter(registry, engine, settings.promote)
    runs_dir = settings.state_dir / RUNS_FOLDER
    runner = None
    if settings.run_jobs:
        command = TrainingCommand(data_dir=settings.data_dir.resolve(), device=settings.training_device,
                                  skip_integrity_check=settings.data_skip_integrity_check)

        def apply_retention() -> None:
            retention.prune(store, runs_dir, registry, settings.keep_runs, settings.keep_versions)

        async def register_then_prune(job: Job, checkpoint: Path, final: dict[str, Any]) -> Conclusion:
            conclusion = await promoter.register_run(job, checkpoint, final)
            await asyncio.to_thread(apply_retention)
            return conclusion

        runner = JobRunner(store, runs_dir.resolve(), command, register_then_prune, store.runner_lock())
        await runner.start()
        if runner.elected:  # a standby never deletes: the runner's jobs and versions are the runner's to prune
            await asyncio.to_thread(apply_retention)
    return ControlPlane(store=store, registry=registry, promoter=promoter, runner=runner, runs_dir=runs_dir,
                        jobs_url=settings.jobs_url)


@dataclass(frozen=True)
class InitialModel:
    """The checkpoint served at start-up, and why that one (shown by ``GET /model`` and logged)."""

    path: Path | None
    origin: str
    # What to serve if ``path`` fails to load (the registry's previous version), rather than nothing.
    fallback: InitialModel | None = None


def initial_model(registry: ModelRegistry, configured: Path | None,
                  shipped_root: Path = SHIPPED_WEIGHTS) -> InitialModel:
    """The registry's current version if there is one, else ``APP_WEIGHTS``, else the best shipped checkpoint.
    A current version comes with the previous one as its fallback, or, without one, what would be served if
    there were no registry."""
    current = registry.current()
    if current is not None:
        fallback = _previous_version(registry) or _without_registry(configured, shipped_root)
        try:
            return InitialModel(registry.path(current), f"registry version {current}, the registry's current "
                                "(it wins over APP_WEIGHTS and the shipped default)", fallback)
        except UnknownVersion:
            logger.error("the registry names %s as current, but it has no such version; serving %s (%s)",
                         current, fallback.path, fallback.origin)
            return fallback
    return _without_registry(configured, shipped_root)


def _without_registry(configured: Path | None, shipped_root: Path) -> InitialModel:
    if configured is not None:
        return InitialModel(configured, "APP_WEIGHTS")
    shipped = best_shipped_checkpoint(shipped_root)
    if shipped is None:
        return InitialModel(None, f"no APP_WEIGHTS and no shipped checkpoint under {shipped_root}")
    return InitialModel(shipped, f"the shipped default: the checkpoint under {shipped_root.name}/ with the "
                        "highest test accuracy")


def _previous_version(registry: ModelRegistry) -> InitialModel | None:
    previous = registry.previous()
    if previous is None:
        return None
    try:
        return InitialModel(registry.path(previous), f"registry version {previous}, the registry's previous: "
                            "its current version could not be served")
    except UnknownVersion:
        return None


def best_shipped_checkpoint(root: Path = SHIPPED_WEIGHTS) -> Path | None:
    """The checkpoint directory under ``root`` whose card reports the highest test accuracy; cards that
    cannot be read are skipped (and logged), directories without a card are not checkpoints."""
    best: tuple[float, str] | None = None
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        try:
            accuracy = read_card(card_path.parent).test_accuracy
        except CheckpointError as error:
            logger.warning("skipping the shipped checkpoint %s: %s", card_path.parent, error)
            continue
        candidate = (accuracy if accuracy is not None else -1.0, card_path.parent.name)
        if best is None or candidate[0] > best[0]:
            best = candidate
    return None if best is None else root / best[1]


async def _follow(registry: ModelRegistry, engine: HotSwappable, interval_s: float) -> None:
    seen = registry.current()
    while True:
        await asyncio.sleep(interval_s)
        current = registry.current()
        serving = engine.card.version if engine.card is not None else None
        if current is None or current == seen or current == serving:
            seen = current
            continue
        seen = current
        try:
            await engine.swap(registry.path(current), origin=f"registry version {current}, the registry's current")
            logger.info("now serving %s, promoted through the shared registry", current)
        except Exception:
            logger.exception("could not serve %s, which the registry names as current; still serving %s until "
                             "the pointer changes again", current, serving)
