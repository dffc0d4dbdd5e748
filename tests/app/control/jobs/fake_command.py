"""The runner's test doubles: a training command that runs fake_training.py instead of ``python -m training``,
and a success handler that records what it was handed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.control.jobs.runner import Conclusion
from app.control.jobs.schemas import Job, JobResult, TrainParams

FAKE_TRAINING = str(Path(__file__).with_name("fake_training.py"))


@dataclass(frozen=True)
class FakeCommand:
    options: tuple[str, ...] = ()

    def start(self, params: TrainParams, run_dir: Path) -> list[str]:
        return [sys.executable, FAKE_TRAINING, str(run_dir), "--epochs", str(params.epochs), *self.options]

    def resume(self, params: TrainParams, run_dir: Path) -> list[str]:
        return self.start(params, run_dir) + ["--resume"]

    def data_problem(self) -> str | None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, dict[str, Any]]] = []

    async def __call__(self, job: Job, checkpoint: Path, final: dict[str, Any]) -> Conclusion:
        self.calls.append((job.id, checkpoint, final))
        return Conclusion(JobResult(model_version="resnet18-abc", test_accuracy=final["test_accuracy"], promoted=True))
