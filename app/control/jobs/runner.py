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
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
from app.control.jobs.store import JobStore, RunnerLock, UnknownJob, this_host
from training.cli import command_line
from training.layout import CHECKPOINT_DIR, DATA_FOLDER, LOG_FILE, METRICS_FILE, STATE_FILE

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
                "there (the official cifar-10-python.tar.gz unpacked; a copy that is not byte-identical to it "
                "also needs APP_DATA_SKIP_INTEGRITY_CHECK=true), or point APP_DATA_DIR at the folder that holds "
                "it; then POST /train again")

    def _launcher(self, params: TrainParams) -> list[str]:
        if params.gpus > 1:
            # torch.distributed.run is torchrun's module; running it with this interpreter avoids PATH lookups.
            return [self.python, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(params.gpus), "-m", "training"]
        return [self.python, "-m", "training"]


class JobRunner:
    """Runs the jobs of one store, on the one process the store's ``RunnerLock`` elects.

    Every replica with ``APP_RUN_JOBS=true`` builds one. The one holding the lock is elected: it first marks
    the jobs a dead runner left running ``interrupted`` (``recover``), then starts queued jobs, whichever
    replica queued them. The others are standbys: they queue, list, cancel and resume jobs through the store,
    and try for the lock every ``election_interval_s``, so one takes over when the runner stops. Without a
    lock (tests, a single process by construction) the runner is elected from the start.
    """

    def __init__(
        self,
        store: JobStore,
        runs_dir: Path,
        command: TrainingCommand,
        on_success: SuccessHandler,
        lock: RunnerLock | None = None,
        *,
        poll_interval_s: float = 0.25,
        stop_timeout_s: float = 30.0,
        election_interval_s: float = 2.0,
    ) -> None:
        self.store = store
        self.runs_dir = runs_dir
        self.command = command
        self.on_success = on_success
        self.lock = lock
        self.poll_interval_s = poll_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.election_interval_s = election_interval_s
        self.host = this_host()
        self.elected = lock is None
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._stopping: dict[str, JobStatus] = {}
        # Jobs whose training exited and whose model is being registered and promoted: past cancelling.
        self._concluding: set[str] = set()
        self._campaign: asyncio.Task[None] | None = None

    @property
    def role(self) -> str:
        """``runner`` or ``standby``, as /healthz shows it."""
        return "runner" if self.elected else "standby"

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def logs(self, job_id: str, tail: int | None = None) -> str:
        return tail_lines(self.run_dir(job_id) / LOG_FILE, tail)

    async def start(self) -> None:
        """Try for the lock once now (so start-up logs say which this process is), then keep trying, or keep
        checking it is still held, in the background. A job database that is down now does not stop the start:
        the next round tries again."""
        try:
            await self._stand()
        except Exception:
            logger.exception("the job runner's first election round failed; retrying every %g s",
                             self.election_interval_s)
        if not self.elected and self.lock is not None:
            logger.warning("standby: another process holds %s and runs the training jobs in %s; this one serves "
                           "predictions, queues jobs for it and takes over if it stops", self.lock.holder,
                           self.store.where)
        self._campaign = asyncio.create_task(self._keep_standing(), name="job runner election")

    async def submit(self, params: TrainParams) -> Job:
        """Queue a job, and start it if this process is the runner (else the runner starts it within
        ``election_interval_s``); raises ``JobConflict`` if one is already queued or running."""
        job = await self._call(self.store.create, params)
        if self.elected:
            await self._dispatch(job)
        return await self._get(job.id)

    async def resume(self, job_id: str) -> Job:
        """Continue an interrupted or cancelled job from its last training-state checkpoint."""
        job = await self._get(job_id)
        if job.status not in RESUMABLE_STATUSES:
            raise JobStateError(f"job {job_id} is {job.status}; only an interrupted or cancelled job can be resumed")
        if not await self._call(self.store.requeue, job_id, only_from=RESUMABLE_STATUSES):
            raise JobStateError(f"job {job_id} changed status meanwhile; GET /train/{job_id} shows it")
        if self.elected:
            await self._dispatch(await self._get(job_id))
        return await self._get(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job and mark it cancelled; its files stay. A job another process runs is
        marked here, and its runner, which watches the record, stops the process group."""
        job = await self._get(job_id)
        if job.status not in ACTIVE_STATUSES:
            raise JobStateError(f"job {job_id} already finished ({job.status}); only a queued or running job "
                                "can be cancelled")
        if job_id in self._concluding:
            raise JobStateError(f"job {job_id} has finished training and its model is being registered; it can "
                                f"no longer be cancelled. GET /train/{job_id} shows the outcome in a moment")
        await self._stop(job_id, JobStatus.CANCELLED, "cancelled by DELETE /train/" + job_id)
        return await self._get(job_id)

    def recover(self) -> list[str]:
        """On election: a job left running by an earlier runner (crashed, killed, or cut off from the
        database) is stopped, its recorded process group killed if it is still alive on this host, and marked
        interrupted. Queued jobs wait for ``_dispatch``. Returns the ids it marked.

        Blocking (the store, waiting for processes to stop): async code calls it in a worker thread. One job
        that cannot be handled is logged and skipped: recovery must not stop the runner, or a start-up."""
        marked = []
        self.store.active()  # settles an unreadable queued or running record (store.active_or_settled)
        for job in self.store.newest_first():
            # A job cancelled through a standby while no runner was elected may have left its process behind.
            if job.status not in (JobStatus.RUNNING, JobStatus.CANCELLED) or job.id in self._children:
                continue
            try:
                recorded = self.store.process(job.id)
                if recorded is not None and recorded.host in (None, self.host):
                    if recorded.started is None:
                        logger.warning("job %s's process %d is not signalled: its start time was not recorded, so "
                                       "the PID may belong to another process by now", job.id, recorded.pid)
                    processes.stop_group(recorded.pid, recorded.started, timeout_s=self.stop_timeout_s)
                if job.status == JobStatus.RUNNING and self.store.finish(
                        job.id, JobStatus.INTERRUPTED, error=_interrupted_message(job.id),
                        only_from=(JobStatus.RUNNING,)):
                    logger.warning("job %s was running when its runner last stopped; marked interrupted", job.id)
                    marked.append(job.id)
            except Exception:
                logger.exception("could not recover job %s; it stays as recorded until the next election", job.id)
        return marked

    async def shutdown(self) -> None:
        """On API shutdown: stop running jobs and mark them interrupted, so none is left orphaned, then give
        up the lock for a standby to take."""
        if self._campaign is not None:
            self._campaign.cancel()
            with suppress(asyncio.CancelledError):
                await self._campaign
        for job_id in list(self._monitors):
            await self._stop(job_id, JobStatus.INTERRUPTED, _interrupted_message(job_id))
        if self.lock is not None:
            self.lock.release()
        self.elected = self.lock is None

    async def _keep_standing(self) -> None:
        while True:
            await asyncio.sleep(self.election_interval_s)
            try:
                await self._stand()
            except Exception:  # a database that is down now may be back next time
                logger.exception("the job runner's election round failed; retrying in %g s",
                                 self.election_interval_s)

    async def _stand(self) -> None:
        """One round: win, keep or lose the election; as the runner, start a queued job."""
        if self.lock is not None and not self.elected:
            if not await asyncio.to_thread(self.lock.acquire):
                logger.debug("standby: %s is held by another process", self.lock.holder)
                return
            logger.info("elected to run training jobs (%s, jobs in %s)", self.lock.holder, self.store.where)
            await asyncio.to_thread(self.recover)
            self.elected = True
        elif self.lock is not None and not await asyncio.to_thread(self.lock.held):
            self.elected = False
            logger.error("lost %s: stopping this process's training jobs, which another runner may now take "
                         "over; trying to be elected again", self.lock.holder)
            for job_id in list(self._monitors):
                await self._stop(job_id, JobStatus.INTERRUPTED, _interrupted_message(job_id))
            return
        job = await self._call(self.store.active)
        if self.elected and job is not None and job.status == JobStatus.QUEUED:
            await self._dispatch(job)

    async def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A job-store call, in a worker thread: the store is synchronous, and a slow or stalled database must
        not hold the event loop (in a process that also serves predictions, every request would wait). The
        stores bound each call with their own timeouts, so the thread comes back too."""
        return await asyncio.to_thread(method, *args, **kwargs)

    async def _get(self, job_id: str) -> Job:
        job = await self._call(self.store.get, job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    async def _dispatch(self, job: Job) -> None:
        """Claim a queued job and start its process: the claim is the store's compare-and-set, so of two
        runners racing for one job only the winner starts a process. A job that ran before (requeued by
        resume) continues from its training state."""
        if job.id in self._children or not await self._call(self.store.claim, job.id, self.host):
            return
        await self._start(job, resume=job.started_at is not None)

    async def _start(self, job: Job, *, resume: bool) -> None:
        if (problem := self.command.data_problem()) is not None:
            await self._call(self.store.finish, job.id, JobStatus.FAILED, error=problem)
            return
        assert job.params is not None  # a queued job is readable (store.active_or_settled)
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
            await self._call(self.store.finish, job.id, JobStatus.FAILED,
                             error=f"could not start training in {run_dir}: {error}")
            return
        self._children[job.id] = child
        # From here on the monitor owns the process: whatever the store does, it follows it to an outcome.
        self._monitors[job.id] = asyncio.create_task(self._follow(job, child), name=f"training job {job.id}")
        try:
            if not resume:
                await self._call(self.store.update_progress, job.id, JobProgress(epoch=0, epochs=job.params.epochs))
            await self._call(self.store.record_process, job.id, child.pid, processes.start_time(child.pid))
        except Exception:
            logger.exception("job %s started, but its record could not be updated", job.id)
        logger.info("job %s %s: pid %d, logs in %s", job.id, "resumed" if continuing else "started", child.pid,
                    log_path)

    async def _follow(self, job: Job, child: subprocess.Popen[bytes]) -> None:
        assert job.params is not None
        epochs = job.params.epochs
        metrics = MetricsFollower(self.run_dir(job.id) / METRICS_FILE)
        try:
            while child.poll() is None:
                try:
                    if metrics.poll():
                        await self._call(self.store.update_progress, job.id, metrics.progress(epochs))
                    if await self._finished_elsewhere(job.id):
                        # Cancelled through another replica: the record says so; this process stops the group.
                        self._stopping[job.id] = JobStatus.CANCELLED
                        await asyncio.to_thread(processes.stop_group, child.pid, None, self.stop_timeout_s, child)
                except Exception:  # a database that is briefly down must not orphan the process
                    logger.warning("could not update job %s's record; retrying", job.id, exc_info=True)
                await asyncio.sleep(self.poll_interval_s)
            if metrics.poll():
                await self._call(self.store.update_progress, job.id, metrics.progress(epochs))
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
                await self._call(self.store.finish, job_id, JobStatus.FAILED, error=error, only_from=ACTIVE_STATUSES)
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
            await self._call(self.store.finish, job.id, JobStatus.FAILED, error=error, only_from=(JobStatus.RUNNING,))
            logger.warning("job %s failed: %s", job.id, error)
            return
        checkpoint = Path(final.get("checkpoint") or CHECKPOINT_DIR)
        checkpoint = checkpoint if checkpoint.is_absolute() else self.run_dir(job.id) / checkpoint
        self._concluding.add(job.id)
        try:
            conclusion = await self.on_success(job, checkpoint, final)
        except Exception as error:
            logger.exception("registering job %s's checkpoint failed", job.id)
            await self._call(self.store.finish, job.id, JobStatus.FAILED, only_from=(JobStatus.RUNNING,),
                             error=f"training finished, but registering its checkpoint {checkpoint} failed: {error}")
            return
        finally:
            self._concluding.discard(job.id)
        if not await self._call(self.store.finish, job.id, JobStatus.SUCCEEDED, result=conclusion.result,
                                error=conclusion.error, only_from=(JobStatus.RUNNING,)):
            # Cancelled through another replica while the model was registered (and perhaps promoted): the
            # record must say what happened, or a served model would belong to a "cancelled" job.
            late = (f"a cancel arrived after training had finished; the model {conclusion.result.model_version} "
                    "was registered anyway")
            note = f"{conclusion.error}; {late}" if conclusion.error else late
            if await self._call(self.store.finish, job.id, JobStatus.SUCCEEDED, result=conclusion.result,
                                error=note, only_from=(JobStatus.CANCELLED,)):
                logger.warning("job %s: %s", job.id, late)
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

    async def _finished_elsewhere(self, job_id: str) -> bool:
        if job_id in self._stopping:
            return False
        current = await self._call(self.store.get, job_id)
        return current is not None and current.status != JobStatus.RUNNING

    async def _stop(self, job_id: str, status: JobStatus, error: str) -> None:
        """Stop a job this process runs (its process group, then its record), or, for a job another runner
        runs, only its record: that runner sees the change and stops its process, wherever it is."""
        child, monitor = self._children.get(job_id), self._monitors.get(job_id)
        if child is not None:
            self._stopping[job_id] = status
            await asyncio.to_thread(processes.stop_group, child.pid, None, self.stop_timeout_s, child)
        try:
            await self._call(self.store.finish, job_id, status, error=None if status == JobStatus.CANCELLED else error)
        except Exception:
            if child is None:
                raise
            # The process is stopped; the record stays "running" until the next runner's recover() marks it.
            logger.exception("stopped job %s but could not record it as %s", job_id, status)
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
    return (f"the API stopped while this job was running (or its runner lost the job database); POST "
            f"/train/{job_id}/resume continues it from its last training-state checkpoint")
