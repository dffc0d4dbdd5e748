"""Runs training jobs as separate processes and follows them to an outcome.

A job is ``python -m training …`` (or ``torchrun --nproc-per-node N -m training …``) in its own session, so the
API keeps serving while it trains and one signal stops the whole group. Its stdout and stderr go to
``<run dir>/train.log``; its progress comes from ``<run dir>/metrics.jsonl``. Every status change goes through
``JobStore``'s compare-and-set updates, so a cancel, the process's own exit and a restarted API cannot
overwrite one another's outcome.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.control.jobs import processes
from app.control.jobs.progress import MetricsFollower, tail_lines
from app.control.jobs.schemas import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    Job,
    JobProgress,
    JobResult,
    JobStatus,
    TrainParams,
)
from app.control.jobs.store import JobStore, UnknownJob
from training.cli import command_line
from training.layout import CHECKPOINT_DIR, DATA_FOLDER, LOG_FILE, METRICS_FILE, STATE_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conclusion:
    """What the success handler made of a finished run: the job's result, and ``error`` when a step after
    training failed (the model was registered but could not be served); the job succeeded either way."""

    result: JobResult
    error: str | None = None


# Called with the finished job, its checkpoint directory and the run's "final" metrics event; registers
# the checkpoint (and promotes it, by policy) and says what came of it.
SuccessHandler = Callable[[Job, Path, dict[str, Any]], Awaitable[Conclusion]]


class JobStateError(Exception):
    """The job is not in a status that allows the request (e.g. cancelling a finished job)."""


@dataclass(frozen=True)
class TrainingCommand:
    """Builds the command line of a training process from a job's parameters and the service's settings,
    through the training module's own inverse of its parser (``training.cli.command_line``)."""

    data_dir: Path
    skip_integrity_check: bool = False
    device: str = "auto"
    python: str = sys.executable

    def start(self, params: TrainParams, run_dir: Path) -> list[str]:
        values = params.model_dump(exclude={"gpus"}) | {"data_dir": str(self.data_dir),
                                                         "skip_integrity_check": self.skip_integrity_check}
        if params.gpus == 1:  # under torchrun each rank takes the GPU of its LOCAL_RANK: no one --device fits all
            values["device"] = self.device
        return self._launcher(params) + ["--run-dir", str(run_dir)] + command_line(values)

    def resume(self, params: TrainParams, run_dir: Path) -> list[str]:
        # A resumed run keeps the configuration in its config.json (device included); the training module
        # refuses options that differ from it.
        return self._launcher(params) + ["--resume", "--run-dir", str(run_dir)]

    def data_problem(self) -> str | None:
        """What is wrong with the data directory, in the service's terms, or None. The training module checks
        the files in detail; this catches the common case (nothing there yet) before a process starts."""
        folder = self.data_dir / DATA_FOLDER
        if folder.is_dir():
            return None
        return (f"no CIFAR-10 in APP_DATA_DIR ({self.data_dir}): expected the folder {folder}. Put the dataset "
                "there (the official cifar-10-python.tar.gz unpacked, or `.venv/bin/python ../shared/cifar10/"
                f"compact/unpack.py --out {self.data_dir}` with APP_DATA_SKIP_INTEGRITY_CHECK=true), or point "
                "APP_DATA_DIR at the folder that holds it; then POST /train again")

    def _launcher(self, params: TrainParams) -> list[str]:
        if params.gpus > 1:
            # torch.distributed.run is torchrun's module; running it with this interpreter avoids PATH lookups.
            return [self.python, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(params.gpus), "-m", "training"]
        return [self.python, "-m", "training"]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        runs_dir: Path,
        command: TrainingCommand,
        on_success: SuccessHandler,
        *,
        poll_interval_s: float = 0.25,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.runs_dir = runs_dir
        self.command = command
        self.on_success = on_success
        self.poll_interval_s = poll_interval_s
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._stopping: dict[str, JobStatus] = {}

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def logs(self, job_id: str, tail: int | None = None) -> str:
        return tail_lines(self.run_dir(job_id) / LOG_FILE, tail)

    async def submit(self, params: TrainParams) -> Job:
        """Queue a job and start it; raises ``JobConflict`` if one is already queued or running."""
        job = self.store.create(params)
        self._start(job, resume=False)
        return self._get(job.id)

    async def resume(self, job_id: str) -> Job:
        """Continue an interrupted or cancelled job from its last training-state checkpoint."""
        job = self._get(job_id)
        if job.status not in RESUMABLE_STATUSES:
            raise JobStateError(f"job {job_id} is {job.status}; only an interrupted or cancelled job can be resumed")
        if not self.store.requeue(job_id, only_from=RESUMABLE_STATUSES):
            raise JobStateError(f"job {job_id} changed status meanwhile; GET /train/{job_id} shows it")
        self._start(self._get(job_id), resume=True)
        return self._get(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job's process group and mark it cancelled; its files stay."""
        job = self._get(job_id)
        if job.status not in ACTIVE_STATUSES:
            raise JobStateError(f"job {job_id} already finished ({job.status}); only a queued or running job "
                                "can be cancelled")
        await self._stop(job_id, JobStatus.CANCELLED, "cancelled by DELETE /train/" + job_id)
        return self._get(job_id)

    def recover(self) -> list[str]:
        """At start-up: a job left queued or running by an earlier API process is stopped (its recorded process
        group killed if that process is still alive) and marked interrupted. Returns the ids it marked."""
        marked = []
        for job in self.store.newest_first():
            if job.status not in ACTIVE_STATUSES or job.id in self._children:
                continue
            recorded = self.store.process(job.id)
            if recorded is not None:
                processes.stop_group(*recorded, timeout_s=self.stop_timeout_s)
            if self.store.finish(job.id, JobStatus.INTERRUPTED, error=_interrupted_message(job.id)):
                logger.warning("job %s was %s when the API last stopped; marked interrupted", job.id, job.status)
                marked.append(job.id)
        return marked

    async def shutdown(self) -> None:
        """On API shutdown: stop running jobs and mark them interrupted, so none is left orphaned."""
        for job_id in list(self._monitors):
            await self._stop(job_id, JobStatus.INTERRUPTED, _interrupted_message(job_id))

    def _get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def _start(self, job: Job, *, resume: bool) -> None:
        if (problem := self.command.data_problem()) is not None:
            self.store.finish(job.id, JobStatus.FAILED, error=problem)
            return
        run_dir = self.run_dir(job.id)
        # Without a training-state checkpoint (stopped before its first one) there is nothing to continue
        # from, so the job starts over with its original parameters.
        continuing = resume and (run_dir / STATE_FILE).is_file()
        argv = (self.command.resume if continuing else self.command.start)(job.params, run_dir)
        log_path = run_dir / LOG_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(f"# {'resuming' if continuing else 'starting'}: {subprocess.list2cmdline(argv)}\n")
            child = processes.launch(argv, log_path)
        except OSError as error:  # an unwritable state directory, a missing interpreter: the job fails, not the API
            self.store.finish(job.id, JobStatus.FAILED, error=f"could not start training in {run_dir}: {error}")
            return
        self._children[job.id] = child
        if not resume:
            self.store.update_progress(job.id, JobProgress(epoch=0, epochs=job.params.epochs))
        self.store.mark_running(job.id, child.pid, processes.start_time(child.pid))
        logger.info("job %s %s: pid %d, logs in %s", job.id, "resumed" if continuing else "started", child.pid,
                    log_path)
        self._monitors[job.id] = asyncio.create_task(self._follow(job, child), name=f"training job {job.id}")

    async def _follow(self, job: Job, child: subprocess.Popen[bytes]) -> None:
        metrics = MetricsFollower(self.run_dir(job.id) / METRICS_FILE)
        try:
            while child.poll() is None:
                if metrics.poll():
                    self.store.update_progress(job.id, metrics.progress(job.params.epochs))
                await asyncio.sleep(self.poll_interval_s)
            if metrics.poll():
                self.store.update_progress(job.id, metrics.progress(job.params.epochs))
            await self._conclude(job, child.returncode, metrics.final)
        except Exception as error:  # the job must end in a final status whatever went wrong here
            logger.exception("following job %s failed", job.id)
            await self._fail(job.id, child, _runner_failure(error, self.runs_dir))
        finally:
            self._children.pop(job.id, None)
            self._monitors.pop(job.id, None)

    async def _fail(self, job_id: str, child: subprocess.Popen[bytes], error: str) -> None:
        """Following the job broke (a full disk, say): stop its training and record the failure, retrying
        while the job database cannot be written, so the job never stays ``running`` and blocks every
        later ``POST /train`` with a 409."""
        if child.poll() is None:
            await asyncio.to_thread(processes.stop_group, child.pid, None, self.stop_timeout_s, child)
        delay = self.poll_interval_s
        while True:
            try:
                self.store.finish(job_id, JobStatus.FAILED, error=error, only_from=ACTIVE_STATUSES)
                logger.error("job %s failed: %s", job_id, error)
                return
            except Exception:
                logger.exception("could not record job %s as failed; retrying in %.2g s", job_id, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    async def _conclude(self, job: Job, returncode: int, final: dict[str, Any] | None) -> None:
        stopped_as = self._stopping.pop(job.id, None)
        if stopped_as is not None:
            return  # _stop records the outcome
        if returncode != 0 or final is None:
            error = self._failure(job.id, returncode)
            self.store.finish(job.id, JobStatus.FAILED, error=error, only_from=(JobStatus.RUNNING,))
            logger.warning("job %s failed: %s", job.id, error)
            return
        checkpoint = Path(final.get("checkpoint") or CHECKPOINT_DIR)
        checkpoint = checkpoint if checkpoint.is_absolute() else self.run_dir(job.id) / checkpoint
        try:
            conclusion = await self.on_success(job, checkpoint, final)
        except Exception as error:
            logger.exception("registering job %s's checkpoint failed", job.id)
            self.store.finish(job.id, JobStatus.FAILED, only_from=(JobStatus.RUNNING,),
                              error=f"training finished, but registering its checkpoint {checkpoint} failed: {error}")
            return
        self.store.finish(job.id, JobStatus.SUCCEEDED, result=conclusion.result, error=conclusion.error,
                          only_from=(JobStatus.RUNNING,))
        logger.info("job %s succeeded: test accuracy %s, model %s", job.id, conclusion.result.test_accuracy,
                    conclusion.result.model_version)

    def _failure(self, job_id: str, returncode: int) -> str:
        """The training module's own ``error:`` line when it wrote one (it does for usage and data problems)."""
        errors = [line for line in self.logs(job_id, tail=50).splitlines() if line.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        if returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"training was killed by {name}{hint}; see GET /train/{job_id}/logs"
        if returncode == 0:
            return f"training exited without a final metrics line; see GET /train/{job_id}/logs"
        return f"training exited with code {returncode}; see GET /train/{job_id}/logs"

    async def _stop(self, job_id: str, status: JobStatus, error: str) -> None:
        child, monitor = self._children.get(job_id), self._monitors.get(job_id)
        if child is not None:
            self._stopping[job_id] = status
            await asyncio.to_thread(processes.stop_group, child.pid, None, self.stop_timeout_s, child)
        elif (recorded := self.store.process(job_id)) is not None:
            # Started by another API process (a replica sharing the state directory, or before a restart).
            await asyncio.to_thread(processes.stop_group, *recorded, self.stop_timeout_s)
        self.store.finish(job_id, status, error=None if status == JobStatus.CANCELLED else error)
        if monitor is not None:
            await monitor
        self._stopping.pop(job_id, None)


def _runner_failure(error: Exception, runs_dir: Path) -> str:
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "disk is full" in str(error)
    if full:
        return (f"the disk holding {runs_dir} is full ({error}); the training was stopped. Free some space "
                "(APP_KEEP_RUNS and APP_KEEP_VERSIONS prune old runs and versions), then POST /train again")
    return f"the job runner failed: {error!r}"


def _interrupted_message(job_id: str) -> str:
    return (f"the API stopped while this job was running; POST /train/{job_id}/resume continues it from its "
            "last training-state checkpoint")
