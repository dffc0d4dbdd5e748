"""Retention: what old training runs and model versions are deleted, so the state directory does not grow
without bound (``APP_KEEP_RUNS``, ``APP_KEEP_VERSIONS``).

Only the replica that runs jobs prunes (at start-up and after each successful job), so two replicas never
race to delete the same directory. Never deleted: a queued or running job's directory, the registry's
``current`` and ``previous`` versions, and any version a serving replica recorded it serves
(``ModelRegistry.record_serving``; ``ModelRegistry.prune``). A pruned job keeps its record; only its files
(log, metrics, training state, checkpoint) go. Leftover ``.staging-*``/``.deleting-*`` folders of
interrupted registrations and deletions go too.

The versions it keeps are verified against their SHA256SUMS each time (``verify_kept``): a damaged one is
logged as an error naming the file, and is replaced by the next registration of the same weights; retention
never deletes it by itself, since it may be ``current``, and an operator should see why.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from app.control.jobs.schemas import ACTIVE_STATUSES
from app.control.jobs.store import JobStore
from app.control.registry import ModelRegistry

logger = logging.getLogger(__name__)


def prune_runs(store: JobStore, runs_dir: Path, keep: int) -> list[str]:
    """Delete the run directories of all but the ``keep`` newest jobs, never an active job's; ``keep`` 0 keeps
    everything. Returns the job ids whose directories went."""
    if keep <= 0 or not runs_dir.is_dir():
        return []
    jobs = store.newest_first()
    kept = {job.id for job in jobs[:keep]} | {job.id for job in jobs if job.status in ACTIVE_STATUSES}
    deleted = []
    for directory in sorted(runs_dir.iterdir()):
        if not directory.is_dir() or directory.name in kept or directory.name.startswith("."):
            continue
        doomed = runs_dir / f".deleting-{uuid.uuid4().hex}"
        directory.rename(doomed)  # gone from runs/ at once; the slow delete cannot leave half a run
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(directory.name)
    return deleted


def verify_kept(registry: ModelRegistry) -> dict[str, list[str]]:
    """Check every registered version's files against its SHA256SUMS; logs and returns the damaged ones."""
    damaged = {}
    for model in registry.versions():
        if problems := registry.verify(model.version):
            damaged[model.version] = problems
            logger.error("registry version %s is damaged: %s; register its checkpoint again to repair it",
                         model.version, "; ".join(problems))
    return damaged


def prune(store: JobStore, runs_dir: Path, registry: ModelRegistry, keep_runs: int, keep_versions: int) -> None:
    """Apply both policies, then verify what is kept; a failure is logged, never raised: retention must not
    fail a job or a start."""
    try:
        runs = prune_runs(store, runs_dir, keep_runs)
        versions = registry.prune(keep_versions)
        verify_kept(registry)
    except Exception:  # the job store may be down (JobStoreUnavailable), the disk odd: logged, retried next time
        logger.exception("pruning old runs and model versions failed")
        return
    if runs or versions:
        logger.info("retention deleted %d run directories and %d model versions", len(runs), len(versions),
                    extra={"runs": runs, "versions": versions})
