"""One job runner among many candidates, on both stores: the store's lock elects one, the standbys leave its
jobs alone and take over when it stops or dies, and two runners racing for one job start it once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.control.jobs import processes
from app.control.jobs.runner import JobRunner
from app.control.jobs.schemas import Job, JobStatus, TrainParams
from app.control.jobs.store import JobConflict, JobStore, open_job_store
from tests.app.control.jobs.fake_command import FakeCommand, Recorder
from tests.support import REPO_ROOT
from tests.support.waiting import eventually, wait_until

FAST = ("--epoch-seconds", "0.1")


class Candidates:
    """Runners standing for election on one database, each with a store of its own (as replicas have)."""

    def __init__(self, database_url: str | None, state_dir: Path) -> None:
        self.database_url, self.state_dir = database_url, state_dir
        self.stores: list[JobStore] = []

    def store(self) -> JobStore:
        self.stores.append(open_job_store(self.database_url, self.state_dir))
        return self.stores[-1]

    def runner(self, *options: str, elect: bool = True) -> JobRunner:
        """A candidate runner; with ``elect=False`` it has no lock and counts itself elected (no election)."""
        store = self.store()
        return JobRunner(store, self.state_dir / "runs", FakeCommand(options), Recorder(),
                         store.runner_lock() if elect else None, poll_interval_s=0.02, stop_timeout_s=5,
                         election_interval_s=0.05)

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def candidates(database_url: str | None, tmp_path: Path) -> Iterator[Candidates]:
    made = Candidates(database_url, tmp_path / "state")
    yield made
    made.close()


async def until(store: JobStore, job_id: str, condition, what: str) -> Job:
    return await eventually(lambda: job if condition(job := store.get(job_id)) else None, what=what)


def final(job: Job) -> bool:
    return job.status not in (JobStatus.QUEUED, JobStatus.RUNNING)


def starts(runner: JobRunner, job_id: str) -> int:
    """How many training processes were started for the job (each start writes one header line)."""
    log = runner.logs(job_id)
    return log.count("# starting: ") + log.count("# resuming: ")


def test_one_candidate_is_elected_and_the_standby_leaves_its_job_alone(candidates: Candidates) -> None:
    async def scenario() -> None:
        first, second = candidates.runner(*FAST), candidates.runner(*FAST)
        await first.start()
        job = await first.submit(TrainParams(epochs=1000))
        await until(first.store, job.id, lambda j: (j.progress.epoch or 0) >= 1, "the first epoch")
        pid, started, _ = first.store.process(job.id)

        await second.start()  # a second instance on the same state directory or database
        assert (first.role, second.role) == ("runner", "standby")
        assert second.store.get(job.id).status == JobStatus.RUNNING and processes.is_alive(pid, started)
        with pytest.raises(JobConflict):
            await second.submit(TrainParams())

        # A cancel through the standby is recorded there; the runner sees it and stops its process.
        assert (await second.cancel(job.id)).status == JobStatus.CANCELLED
        await eventually(lambda: not processes.is_alive(pid, started), what="the runner to stop the process")
        assert first.store.get(job.id).status == JobStatus.CANCELLED and first.store.get(job.id).error is None
        await first.shutdown()
        await second.shutdown()

    asyncio.run(scenario())


def test_a_job_queued_on_a_standby_runs_on_the_runner(candidates: Candidates) -> None:
    async def scenario() -> None:
        runner, standby = candidates.runner(*FAST), candidates.runner(*FAST)
        await runner.start()
        await standby.start()
        job = await standby.submit(TrainParams(epochs=2))
        assert job.status == JobStatus.QUEUED
        done = await until(standby.store, job.id, final, "the job to finish")
        assert done.status == JobStatus.SUCCEEDED and done.result is not None
        assert len(runner.on_success.calls) == 1  # type: ignore[attr-defined]
        assert standby.on_success.calls == [] and starts(runner, job.id) == 1  # type: ignore[attr-defined]
        await runner.shutdown()
        await standby.shutdown()

    asyncio.run(scenario())


def test_the_standby_takes_over_when_the_runner_stops_and_resumes_the_job(candidates: Candidates) -> None:
    async def scenario() -> None:
        runner, standby = candidates.runner(*FAST), candidates.runner("--epoch-seconds", "0.01")
        await runner.start()
        await standby.start()
        job = await runner.submit(TrainParams(epochs=30))
        await until(runner.store, job.id, lambda j: (j.progress.epoch or 0) >= 2, "two epochs")
        await runner.shutdown()  # e.g. a rolling update: the job is interrupted and the lock given up
        assert runner.store.get(job.id).status == JobStatus.INTERRUPTED
        await eventually(lambda: standby.elected, what="the standby to be elected")
        await standby.resume(job.id)
        done = await until(standby.store, job.id, final, "the resumed job")
        assert done.status == JobStatus.SUCCEEDED and done.progress.epoch == 30
        assert "# resuming: " in standby.logs(job.id)
        await standby.shutdown()

    asyncio.run(scenario())


def test_two_runners_that_both_saw_a_job_queued_start_it_once(candidates: Candidates) -> None:
    """Even without an election (both count themselves the runner), the store's claim lets one start it."""

    async def scenario() -> None:
        one, other = candidates.runner(*FAST, elect=False), candidates.runner(*FAST, elect=False)
        job = candidates.store().create(TrainParams(epochs=2))
        seen_by_both = one.store.get(job.id)
        assert seen_by_both.status == JobStatus.QUEUED
        await asyncio.gather(one._dispatch(seen_by_both), other._dispatch(seen_by_both))
        done = await until(one.store, job.id, final, "the job")
        assert done.status == JobStatus.SUCCEEDED and starts(one, job.id) == 1  # one log, shared by both
        # Either may win the claim (the store is called off the event loop, so the two race for real); the
        # other must neither start it nor conclude it.
        concluded = (len(one.on_success.calls), len(other.on_success.calls))  # type: ignore[attr-defined]
        assert sorted(concluded) == [0, 1], concluded
        await one.shutdown()
        await other.shutdown()

    asyncio.run(scenario())


def test_two_runner_processes_racing_elect_one_and_run_the_job_once(candidates: Candidates) -> None:
    async def scenario() -> None:
        with runner_process(candidates.state_dir, candidates.database_url) as one, \
                runner_process(candidates.state_dir, candidates.database_url) as other:
            roles = sorted(process.stdout.readline().strip() for process in (one, other))  # type: ignore[union-attr]
            assert roles == ["elected", "standby"]
            store = candidates.store()
            job = store.create(TrainParams(epochs=3))
            done = await until(store, job.id, final, "the job")
            assert done.status == JobStatus.SUCCEEDED and done.progress.epoch == 3
            log = (candidates.state_dir / "runs" / job.id / "train.log").read_text()
            assert log.count("# starting: ") == 1 and log.count("training from epoch 1") == 1

    asyncio.run(scenario())


def test_many_claims_on_one_job_have_one_winner(candidates: Candidates) -> None:
    racers = 8
    stores = [candidates.store() for _ in range(racers)]

    def claim(store: JobStore, job_id: str, host: str, barrier: threading.Barrier, wins: list[str]) -> None:
        barrier.wait()
        if store.claim(job_id, host):
            wins.append(host)

    for _ in range(10):
        job = stores[0].create(TrainParams())
        barrier, wins = threading.Barrier(racers), []
        threads = [threading.Thread(target=claim, args=(store, job.id, f"host-{n}", barrier, wins))
                   for n, store in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1 and stores[0].process(job.id) is None
        assert stores[0].get(job.id).status == JobStatus.RUNNING
        stores[0].finish(job.id, JobStatus.SUCCEEDED)


@contextmanager
def runner_process(state_dir: Path, database_url: str | None) -> Iterator[subprocess.Popen[str]]:
    argv = [sys.executable, "-m", "tests.app.control.jobs.runner_process", str(state_dir)]
    process = subprocess.Popen(argv + ([database_url] if database_url else []), cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_runner_killed_mid_job_leaves_it_interrupted_for_the_next_to_resume(candidates: Candidates) -> None:
    async def scenario() -> None:
        with runner_process(candidates.state_dir, candidates.database_url) as killed:
            assert killed.stdout is not None and killed.stdout.readline().strip() == "elected"
            standby = candidates.runner("--epoch-seconds", "0.01")
            await standby.start()
            assert standby.role == "standby"
            job = await standby.submit(TrainParams(epochs=40))  # the runner process picks it up
            running = await until(standby.store, job.id, lambda j: (j.progress.epoch or 0) >= 2, "two epochs")
            assert running.status == JobStatus.RUNNING
            orphan = standby.store.process(job.id)
            killed.send_signal(signal.SIGKILL)  # no shutdown runs: its training process is orphaned
            killed.wait()
            killed_at = time.monotonic()
            assert processes.is_alive(orphan.pid, orphan.started)

            interrupted = await until(standby.store, job.id, lambda j: j.status == JobStatus.INTERRUPTED,
                                      "the standby to take over and mark the job interrupted")
            took_over_s = time.monotonic() - killed_at
            assert "resume" in interrupted.error
            await eventually(lambda: standby.elected, what="the standby to count itself elected")
            wait_until(lambda: not processes.is_alive(orphan.pid, orphan.started), what="the orphan to be stopped")
            epochs_before = interrupted.progress.epoch

            await standby.resume(job.id)
            done = await until(standby.store, job.id, final, "the resumed job")
            assert done.status == JobStatus.SUCCEEDED and done.progress.epoch == 40, standby.logs(job.id)
            resumed_from = int(standby.logs(job.id).split("training from epoch ")[-1].split()[0])
            assert resumed_from > 1 and epochs_before >= 2
            print(f"takeover {took_over_s:.2f} s after the kill; resumed from epoch {resumed_from}")
            await standby.shutdown()

    asyncio.run(scenario())
