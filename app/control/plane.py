"""The control plane as its own process holds it for one lifespan: job store, registry, promoter and runner.

Built in the control app's lifespan (``app/control/service.py``, ``open_control_plane``) and closed there
(``close``); the routes reach it through ``app/api/deps.py``. This module wires the others together and is
the only one that imports all of them (``app/control/__init__.py`` draws the arrows). It also picks the model a
serving replica starts with (``initial_model``), the same choice the control plane compares new runs with.

The control process serves no model: promoting verifies the version's files (``VerifiedPointer``) and moves
the registry's pointer; the serving replicas follow the pointer (``app/control/follower.py``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
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
from model.card import CARD_FILE, WEIGHTS_FILE, CheckpointError, ModelCard, file_sha256, read_card
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

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.shutdown()
        self.store.close()


class VerifiedPointer:
    """What promotion swaps in the control process, which serves no model: ``swap`` verifies the checkpoint's
    files (its card, and the weights' SHA-256 against it) before the promoter moves the registry's pointer,
    so the pointer never names a version whose files are broken; ``card`` is the last one verified, at first
    the model a replica starts with (the incumbent a new run is compared with before any promotion)."""

    def __init__(self, card: ModelCard | None) -> None:
        self._card = card

    @property
    def card(self) -> ModelCard | None:
        return self._card

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard:
        self._card = await asyncio.to_thread(verified_card, checkpoint)
        logger.info("verified %s for promotion (%s)", self._card.version, origin or checkpoint)
        return self._card


def verified_card(checkpoint: Path) -> ModelCard:
    """The checkpoint's card, once its weights match the card's SHA-256; raises ``CheckpointError``."""
    card = read_card(checkpoint)
    weights = Path(checkpoint) / WEIGHTS_FILE
    try:
        digest = file_sha256(weights)
    except OSError as error:
        raise CheckpointError(f"cannot read the weights at {weights}: {error.strerror or error}") from None
    if digest != card.weights_sha256:
        raise CheckpointError(f"{weights} does not match its card's SHA-256; the checkpoint is damaged")
    return card


def _start_up_card(choice: InitialModel) -> ModelCard | None:
    if choice.path is None:
        return None
    try:
        return read_card(choice.path)
    except (CheckpointError, OSError):
        return None


async def open_control_plane(settings: Settings) -> ControlPlane:
    """Open the job store and the registry; with APP_RUN_JOBS, stand for election as the job runner. The
    elected process first stops and marks ``interrupted`` any job an earlier runner left running."""
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    store = await asyncio.to_thread(open_job_store, url, settings.state_dir)
    registry = ModelRegistry(settings.registry_path)
    start_up = await asyncio.to_thread(initial_model, registry, settings.weights, settings.shipped_weights)
    target: HotSwappable = VerifiedPointer(await asyncio.to_thread(_start_up_card, start_up))
    promoter = ModelPromoter(registry, target, settings.promote)
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


def initial_model(registry: ModelRegistry | None, configured: Path | None,
                  shipped_root: Path = SHIPPED_WEIGHTS) -> InitialModel:
    """The registry's current version if there is one, else ``APP_WEIGHTS``, else the best shipped checkpoint.
    A current version comes with the previous one as its fallback, or, without one, what would be served if
    there were no registry. A registry that cannot be read counts as none (the follower reports the error
    and serves the pointer's version once it can read it): start-up never fails on it."""
    try:
        current = registry.current() if registry is not None else None
    except Exception as error:  # EIO, ESTALE, not UTF-8, a directory: any read error
        logger.error("the registry's pointer cannot be read (%r); starting without it", error)
        current = None
    if registry is not None and current is not None:
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
    try:
        previous = registry.previous()
    except Exception:  # as unreadable as the current one may be: no fallback from the registry
        return None
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
