"""Retention: what old training runs and model versions are deleted, so the state directory does not grow
without bound (``APP_KEEP_RUNS``, ``APP_KEEP_VERSIONS``).

Only the replica that runs jobs prunes (at start-up and after each successful job), so two replicas never
race to delete the same directory. Never deleted: a queued or running job's directory, the registry's
``current`` and ``previous`` versions (``ModelRegistry.prune``). A pruned job keeps its record; only its
files (log, metrics, training state, checkpoint) go.
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


def prune(store: JobStore, runs_dir: Path, registry: ModelRegistry, keep_runs: int, keep_versions: int) -> None:
    """Apply both policies; a failure is logged, never raised: retention must not fail a job or a start."""
    try:
        runs = prune_runs(store, runs_dir, keep_runs)
        versions = registry.prune(keep_versions)
    except OSError:
        logger.exception("pruning old runs and model versions failed")
        return
    if runs or versions:
        logger.info("retention deleted %d run directories and %d model versions", len(runs), len(versions),
                    extra={"runs": runs, "versions": versions})
