import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.control.jobs.schemas import Job, JobStatus, TrainParams
from app.control.promotion import ModelPromoter, should_promote
from app.control.registry import ModelRegistry, UnknownVersion
from model.checkpoint import ModelCard, read_card
from tests.support.checkpoints import make_checkpoint


class FakeEngine:
    def __init__(self, card: ModelCard | None, fail: bool = False) -> None:
        self.card = card
        self.fail = fail
        self.swapped: list[Path] = []
        self.origins: list[str] = []

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard:
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        self.swapped.append(checkpoint)
        self.origins.append(origin)
        self.card = read_card(checkpoint)
        return self.card


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    # make_checkpoint's test_accuracy is 0.1 + seed / 100.
    return [make_checkpoint(root / f"c{seed}", seed=seed) for seed in (0, 5)]


def job() -> Job:
    return Job(id="job1", status=JobStatus.RUNNING, params=TrainParams(), created_at=datetime.now(UTC))


@pytest.mark.parametrize(("policy", "candidate", "serving", "expected"), [
    ("always", 0.1, 0.9, True), ("never", 0.9, 0.1, False),
    ("if-better", 0.5, 0.5, True), ("if-better", 0.49, 0.5, False), ("if-better", 0.2, None, True),
    ("if-better", None, 0.5, False),
])
def test_should_promote(policy: str, candidate: float | None, serving: float | None, expected: bool,
                        checkpoints: list[Path]) -> None:
    card = read_card(checkpoints[0]).model_copy(update={"test_accuracy": serving})
    assert should_promote(policy, candidate, card) is expected


def test_should_promote_when_nothing_is_served() -> None:
    assert should_promote("if-better", 0.01, None)


def test_if_better_promotes_a_better_run_and_registers_a_worse_one(tmp_path: Path,
                                                                   checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(tmp_path / "registry")
        engine = FakeEngine(read_card(checkpoints[0]))
        promoter = ModelPromoter(registry, engine, "if-better")
        better = (await promoter.register_run(job(), checkpoints[1], {"test_accuracy": 0.15})).result
        assert better.promoted and registry.current() == better.model_version == engine.card.version
        worse = (await promoter.register_run(job(), checkpoints[0], {"test_accuracy": 0.10})).result
        assert not worse.promoted and registry.current() == better.model_version
        assert {m.version for m in registry.versions()} == {better.model_version, worse.model_version}
        # By hand, an operator rolls back to the worse one.
        await promoter.promote(worse.model_version)
        assert registry.current() == worse.model_version == engine.card.version
        # /model tells the operator why each served model is served.
        assert engine.origins == [f"registry version {better.model_version}, promoted",
                                  f"registry version {worse.model_version}, promoted"]
        with pytest.raises(UnknownVersion):
            await promoter.promote("resnet18-ffffffffffff")

    asyncio.run(scenario())


def test_a_failed_swap_leaves_the_pointer_alone(tmp_path: Path, checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(tmp_path / "registry")
        promoter = ModelPromoter(registry, FakeEngine(None, fail=True), "always")
        conclusion = await promoter.register_run(job(), checkpoints[0], {"test_accuracy": 0.1})
        assert "out of memory" in conclusion.error and "POST /admin/promote/" in conclusion.error
        assert not conclusion.result.promoted and registry.current() is None
        assert registry.versions()[0].version == conclusion.result.model_version

    asyncio.run(scenario())
