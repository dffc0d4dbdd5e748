"""A job runner in a process of its own, for the tests that kill one: ``python runner_process.py STATE_DIR
[DATABASE_URL]``. It stands for election on the store (SQLite in STATE_DIR, or PostgreSQL), runs queued jobs
with fake_training.py, prints ``elected`` or ``standby`` once, and runs until it is killed."""

import asyncio
import sys
from pathlib import Path

from app.control.jobs.runner import JobRunner
from app.control.jobs.store import open_job_store
from tests.app.control.jobs.fake_command import FakeCommand, Recorder


async def main(state_dir: Path, database_url: str | None) -> None:
    store = open_job_store(database_url, state_dir)
    runner = JobRunner(store, state_dir / "runs", FakeCommand(("--epoch-seconds", "0.1")), Recorder(),
                       store.runner_lock(), poll_interval_s=0.02, election_interval_s=0.05)
    await runner.start()
    print("elected" if runner.elected else "standby", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
