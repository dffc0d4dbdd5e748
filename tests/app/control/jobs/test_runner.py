import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.control.jobs import processes
from app.control.jobs.runner import JobRunner, JobStateError, TrainingCommand
from app.control.jobs.schemas import Job, JobResult, JobStatus, TrainParams
from app.control.jobs.sqlite_store import SQLiteJobStore
from app.control.jobs.store import JobConflict, open_job_store, this_host
from tests.app.control.jobs.fake_command import FakeCommand, Recorder
from tests.app.control.jobs.records import poison
from tests.support.training_api import TINY_JOB
from tests.support.waiting import eventually


def make_runner(tmp_path: Path, *options: str, stop_timeout_s: float = 5.0) -> tuple[JobRunner, Recorder]:
    recorder = Recorder()
    runner = JobRunner(SQLiteJobStore(tmp_path / "jobs.sqlite3"), tmp_path / "runs", FakeCommand(options), recorder,
                       poll_interval_s=0.02, stop_timeout_s=stop_timeout_s)
    return runner, recorder


async def wait_for(runner: JobRunner, job_id: str, condition) -> Job:
    return await eventually(lambda: job if condition(job := runner.store.get(job_id)) else None,
                            what=f"job {job_id} to reach the expected state")


def finished(job: Job) -> bool:
    return job.status not in (JobStatus.QUEUED, JobStatus.RUNNING)


def test_a_job_runs_to_success_with_advancing_progress(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, recorder = make_runner(tmp_path, "--epoch-seconds", "0.3", "--accuracy", "0.75")
        job = await runner.submit(TrainParams(epochs=3))
        assert job.status == JobStatus.RUNNING and job.progress.epoch == 0 and job.progress.epochs == 3
        with pytest.raises(JobConflict) as conflict:
            await runner.submit(TrainParams())
        assert conflict.value.active_id == job.id
        seen = set()

        def progress(job: Job) -> bool:
            seen.add(job.progress.epoch)
            return finished(job)

        current = await wait_for(runner, job.id, progress)
        assert {1, 2, 3} <= seen
        assert current.status == JobStatus.SUCCEEDED and current.error is None
        assert current.result == JobResult(model_version="resnet18-abc", test_accuracy=0.75, promoted=True)
        assert current.progress.epoch == 3 and current.progress.train_loss == pytest.approx(2 / 3)
        assert current.finished_at >= current.started_at >= current.created_at
        assert recorder.calls == [(job.id, runner.run_dir(job.id) / "checkpoint", recorder.calls[0][2])]
        assert "training from epoch 1" in runner.logs(job.id)
        assert runner.logs(job.id, tail=1) == "training from epoch 1\n"

    asyncio.run(scenario())


def test_a_failing_job_reports_the_training_error_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, recorder = make_runner(tmp_path, "--error", "no CIFAR-10 in /data: download it there")
        job = await runner.submit(TrainParams())
        job = await wait_for(runner, job.id, finished)
        assert job.status == JobStatus.FAILED and job.error == "no CIFAR-10 in /data: download it there"
        assert job.result is None and recorder.calls == []

    asyncio.run(scenario())


def test_cancel_stops_the_process_group_and_keeps_the_files(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, _ = make_runner(tmp_path, "--epoch-seconds", "0.2")
        job = await runner.submit(TrainParams(epochs=100))
        await wait_for(runner, job.id, lambda j: (j.progress.epoch or 0) >= 1)
        pid, started, _ = runner.store.process(job.id)
        assert processes.is_alive(pid, started)
        cancelled = await runner.cancel(job.id)
        assert cancelled.status == JobStatus.CANCELLED and cancelled.error is None
        assert not processes.is_alive(pid, started)
        assert (runner.run_dir(job.id) / "metrics.jsonl").is_file()
        with pytest.raises(JobStateError, match="already finished"):
            await runner.cancel(job.id)

    asyncio.run(scenario())


def test_cancel_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, _ = make_runner(tmp_path, "--ignore-sigterm", "--epoch-seconds", "0.2", stop_timeout_s=0.5)
        job = await runner.submit(TrainParams(epochs=100))
        await wait_for(runner, job.id, lambda j: (j.progress.epoch or 0) >= 1)
        pid, started, _ = runner.store.process(job.id)
        began = time.monotonic()
        assert (await runner.cancel(job.id)).status == JobStatus.CANCELLED
        assert 0.4 < time.monotonic() - began < 5 and not processes.is_alive(pid, started)

    asyncio.run(scenario())


def test_restart_interrupts_an_orphaned_job_and_resume_continues_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        # An earlier API process started this job and died without stopping it.
        earlier, _ = make_runner(tmp_path)
        job = earlier.store.create(TrainParams(epochs=100))
        run_dir = earlier.run_dir(job.id)
        run_dir.mkdir(parents=True)
        argv = FakeCommand(("--epoch-seconds", "0.1")).start(job.params, run_dir)
        orphan = processes.launch(argv, run_dir / "train.log")
        assert earlier.store.claim(job.id, this_host())
        earlier.store.record_process(job.id, orphan.pid, processes.start_time(orphan.pid))
        await eventually((run_dir / "state.pt").exists, what="the orphan's first training state")

        runner, recorder = make_runner(tmp_path, "--epoch-seconds", "0.01")
        assert runner.recover() == [job.id]
        assert orphan.wait(timeout=5) is not None
        interrupted = runner.store.get(job.id)
        assert interrupted.status == JobStatus.INTERRUPTED and "resume" in interrupted.error
        with pytest.raises(JobStateError):
            await runner.cancel(job.id)

        resumed = await runner.resume(job.id)
        assert resumed.status == JobStatus.RUNNING
        done = await wait_for(runner, job.id, finished)
        assert done.status == JobStatus.SUCCEEDED and done.progress.epoch == 100
        first_epoch = int(runner.logs(job.id).split("training from epoch ")[-1].split()[0])
        assert first_epoch > 1
        with pytest.raises(JobStateError, match="only an interrupted or cancelled"):
            await runner.resume(job.id)

    asyncio.run(scenario())


def test_recover_never_signals_a_reused_pid(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path)
    job = runner.store.create(TrainParams())
    bystander = processes.launch([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log")
    try:
        runner.store.claim(job.id, this_host())
        runner.store.record_process(job.id, bystander.pid, processes.start_time(bystander.pid) - 1)
        assert runner.recover() == [job.id]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_shutdown_stops_running_jobs_and_marks_them_interrupted(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, _ = make_runner(tmp_path, "--epoch-seconds", "0.2")
        job = await runner.submit(TrainParams(epochs=100))
        pid, started, _ = runner.store.process(job.id)
        await runner.shutdown()
        assert runner.store.get(job.id).status == JobStatus.INTERRUPTED
        assert not processes.is_alive(pid, started)

    asyncio.run(scenario())


def test_training_command_maps_every_parameter_to_its_flag(tmp_path: Path) -> None:
    params = TrainParams(arch="resnet18", epochs=2, batch_size=16, lr=0.05, seed=3, ema=True, tta=False,
                         compile=True, checkpoint_every=2, train_limit=64, test_limit=32, holdout=8,
                         warmup_epochs=0.5, weights_dtype="float16")
    command = TrainingCommand(data_dir=Path("/data"), skip_integrity_check=True, device="cuda:1", python="py")
    argv = command.start(params, tmp_path)
    assert argv[:3] == ["py", "-m", "training"]
    flags = " ".join(argv[3:]) + " "
    for expected in ("--data-dir /data ", f"--run-dir {tmp_path} ", "--arch resnet18 ", "--epochs 2 ",
                     "--batch-size 16 ", "--lr 0.05 ", "--seed 3 ", "--ema ", "--no-tta ", "--compile ",
                     "--checkpoint-every 2 ", "--train-limit 64 ", "--test-limit 32 ", "--holdout 8 ",
                     "--warmup-epochs 0.5 ", "--weights-dtype float16 ", "--skip-integrity-check ",
                     "--device cuda:1 ", "--plots ", "--lr-decay linear "):
        assert expected in flags
    assert "--deterministic" not in flags
    assert "--lr " not in " ".join(command.start(TrainParams(), tmp_path))
    assert command.resume(params, tmp_path) == ["py", "-m", "training", "--resume", "--run-dir", str(tmp_path)]
    multi = command.start(params.model_copy(update={"gpus": 4}), tmp_path)
    assert multi[:8] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                         "-m", "training"]
    assert "--device" not in multi and "--gpus" not in multi


def test_a_missing_dataset_fails_the_job_before_any_process_starts(tmp_path: Path) -> None:
    async def scenario() -> None:
        command = TrainingCommand(data_dir=tmp_path / "data")
        runner = JobRunner(SQLiteJobStore(tmp_path / "jobs.db"), tmp_path / "runs", command, Recorder())
        job = await runner.submit(TrainParams())
        assert job.status == JobStatus.FAILED and runner.store.process(job.id) is None
        assert f"no CIFAR-10 in APP_DATA_DIR ({tmp_path / 'data'})" in job.error and "POST /train" in job.error
        (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
        assert command.data_problem() is None

    asyncio.run(scenario())


def test_resuming_before_the_first_training_state_starts_over(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, _ = make_runner(tmp_path, "--epoch-seconds", "0.01")
        job = await runner.submit(TrainParams(epochs=3))
        await runner.cancel(job.id)
        (runner.run_dir(job.id) / "state.pt").unlink(missing_ok=True)
        await runner.resume(job.id)
        assert (await wait_for(runner, job.id, finished)).status == JobStatus.SUCCEEDED
        log = runner.logs(job.id)
        assert log.count("# starting: ") == 2 and "# resuming: " not in log

    asyncio.run(scenario())


def test_the_training_process_inherits_neither_the_admin_token_nor_the_database_url(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    monkeypatch.setenv("APP_ADMIN_TOKEN", "a-secret-the-trainer-never-needs")
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://jobs:its-password@db/jobs")
    monkeypatch.setenv("APP_DATA_DIR", "/kept")
    script = ("import os; print(os.environ.get('APP_ADMIN_TOKEN'), os.environ.get('APP_DATABASE_URL'), "
              "os.environ['APP_DATA_DIR'])")
    processes.launch([sys.executable, "-c", script], tmp_path / "log").wait()
    assert (tmp_path / "log").read_text() == "None None /kept\n"


def test_recover_never_signals_a_pid_whose_start_time_is_unknown(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path)
    job = runner.store.create(TrainParams())
    bystander = processes.launch([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log")
    try:
        runner.store.claim(job.id, this_host())
        runner.store.record_process(job.id, bystander.pid, None)  # as a runner that crashed mid-launch left it
        assert runner.recover() == [job.id]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_recover_marks_running_jobs_past_an_unreadable_record(tmp_path: Path, database_url: str | None) -> None:
    store = open_job_store(database_url, tmp_path / "state")
    runner = JobRunner(store, tmp_path / "runs", FakeCommand(()), Recorder())
    try:
        poisoned = store.create(TrainParams())
        store.finish(poisoned.id, JobStatus.FAILED, error="x")
        running = store.create(TrainParams())
        store.claim(running.id, this_host())
        # As POST /train {"norm_lr_scale": 1e999} once stored it.
        poison(database_url, tmp_path / "state", poisoned.id, '{"norm_lr_scale": null}')
        assert runner.recover() == [running.id]  # before the fix: a ValidationError, and the service exited
        assert store.get(running.id).status == JobStatus.INTERRUPTED
        # A running record that cannot be read is settled as failed, so it stops holding the active slot.
        stuck = store.create(TrainParams())
        store.claim(stuck.id, this_host())
        poison(database_url, tmp_path / "state", stuck.id, '{"epochs": -1}')
        assert runner.recover() == [] and store.active() is None
        assert store.get(stuck.id).status == JobStatus.FAILED and "epochs" in store.get(stuck.id).error
    finally:
        store.close()


class HeldConclusion:
    """A success handler that registers and promotes only when the test lets it: a window to cancel in."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, job: Job, checkpoint: Path, final: dict[str, Any]) -> Any:
        from app.control.jobs.runner import Conclusion

        self.entered.set()
        await self.release.wait()
        return Conclusion(JobResult(model_version="resnet18-abc", test_accuracy=0.5, promoted=True))


@pytest.mark.parametrize("where", ["this runner", "another replica"])
def test_a_cancel_while_the_model_is_promoted_leaves_the_job_succeeded(tmp_path: Path, where: str) -> None:
    async def scenario() -> None:
        runner, _ = make_runner(tmp_path, "--epoch-seconds", "0.01")
        held = HeldConclusion()
        runner.on_success = held
        job = await runner.submit(TrainParams(epochs=2))
        await asyncio.wait_for(held.entered.wait(), timeout=120)
        if where == "this runner":
            with pytest.raises(JobStateError, match="being registered"):
                await runner.cancel(job.id)
        else:  # DELETE through a standby: the record only
            assert runner.store.finish(job.id, JobStatus.CANCELLED)
        held.release.set()
        done = await wait_for(runner, job.id, lambda j: j.status == JobStatus.SUCCEEDED)
        assert done.result.promoted and done.result.model_version == "resnet18-abc"
        if where == "another replica":
            assert "a cancel arrived after training had finished" in done.error

    asyncio.run(scenario())


class StalledStore(SQLiteJobStore):
    """A job store whose reads stall until the test lets them go (a database that stopped answering). The stall
    ends by itself after a while, so a runner that blocked the event loop makes the test fail, not hang."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import threading

        self.stalled = threading.Event()
        self.release = threading.Event()
        self.stall = False
        self.released_by_test: list[bool] = []

    def get(self, job_id: str) -> Job | None:
        if self.stall:
            self.stalled.set()
            self.released_by_test.append(self.release.wait(timeout=20))
        return super().get(job_id)


def test_a_stalled_job_store_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = StalledStore(tmp_path / "jobs.sqlite3")
        runner = JobRunner(store, tmp_path / "runs", FakeCommand(()), Recorder(), poll_interval_s=0.02)
        job = store.create(TrainParams())
        store.finish(job.id, JobStatus.CANCELLED)
        store.stall = True
        resuming = asyncio.create_task(runner.resume(job.id))
        # The loop runs other work (here: this wait) while the store call hangs in its worker thread; before the
        # fix the call ran on the loop itself, nothing else ran until the store answered.
        await eventually(store.stalled.is_set, what="the store call to start")
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not resuming.done()
        store.stall = False
        store.release.set()
        resumed = await resuming
        assert store.released_by_test == [True] and resumed.id == job.id
        await runner.shutdown()

    asyncio.run(scenario())


def test_a_diverging_training_run_fails_its_job_with_the_reason(tmp_path: Path, synthetic_cifar10: Path) -> None:
    """The real training module, not a fake: a learning rate far too high makes the loss NaN, and the job
    fails saying so instead of registering NaN weights."""
    async def scenario() -> None:
        recorder = Recorder()
        command = TrainingCommand(data_dir=synthetic_cifar10, skip_integrity_check=True, device="cpu")
        runner = JobRunner(SQLiteJobStore(tmp_path / "jobs.sqlite3"), tmp_path / "runs", command, recorder,
                           poll_interval_s=0.05)
        params = TrainParams(**(TINY_JOB | {"lr": 100.0, "norm_lr_scale": 1e30}))
        job = await runner.submit(params)
        done = await wait_for(runner, job.id, finished)
        assert done.status == JobStatus.FAILED
        assert done.error.startswith("training diverged: ") and "lower --lr" in done.error
        assert recorder.calls == []  # nothing registered, nothing promoted
        await runner.shutdown()

    asyncio.run(scenario())
