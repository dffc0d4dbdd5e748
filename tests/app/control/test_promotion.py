import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.control.jobs.schemas import Job, JobStatus, TrainParams
from app.control.promotion import ModelPromoter, decide, should_promote
from app.control.registry import ModelRegistry, PromotionBusy, UnknownVersion
from model.card import CheckpointError, ModelCard, read_card
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
    assert should_promote(policy, candidate, card, card.test_set_sha256) is expected


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


def smoke_job(**params: int) -> Job:
    return Job(id="smoke", status=JobStatus.RUNNING, params=TrainParams(**params), created_at=datetime.now(UTC))


@pytest.mark.parametrize("policy", ["if-better", "always"])
def test_a_run_scored_on_part_of_the_test_set_is_registered_but_never_promoted(tmp_path: Path, policy: str,
                                                                               checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(tmp_path / "registry")
        engine = FakeEngine(read_card(checkpoints[0]))
        promoter = ModelPromoter(registry, engine, policy)
        # The case: one test image, scored 1.0, against a far better model measured on all of them.
        final = {"test_accuracy": 1.0, "test_images": 1}
        result = (await promoter.register_run(smoke_job(test_limit=1), checkpoints[1], final)).result
        assert not result.promoted and registry.current() is None and engine.swapped == []
        assert "1 of the 10000 test images" in result.reason
        assert f"POST /admin/promote/{result.model_version}" in result.reason

    asyncio.run(scenario())


def test_a_run_limited_to_part_of_the_training_set_is_compared_honestly(tmp_path: Path,
                                                                        checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(tmp_path / "registry")
        promoter = ModelPromoter(registry, FakeEngine(read_card(checkpoints[0])), "if-better")
        final = {"test_accuracy": 0.2, "test_images": 10_000}
        result = (await promoter.register_run(smoke_job(train_limit=64), checkpoints[1], final)).result
        assert result.promoted and "0.2000 >= 0.1000" in result.reason

    asyncio.run(scenario())


def test_if_better_compares_with_the_registry_current_not_this_replica_model(tmp_path: Path,
                                                                             checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(tmp_path / "registry")
        # Another replica promoted the better model (0.15); this replica still serves the worse one (0.10).
        better = registry.register(checkpoints[1]).version
        registry.set_current(better)
        engine = FakeEngine(read_card(checkpoints[0]))
        promoter = ModelPromoter(registry, engine, "if-better")
        other = make_checkpoint(tmp_path / "other", seed=3)  # claims 0.13
        result = (await promoter.register_run(job(), other, {"test_accuracy": 0.13, "test_images": 10_000})).result
        assert not result.promoted and registry.current() == better
        assert result.reason == f"test accuracy 0.1300 < 0.1500 of {better}"

    asyncio.run(scenario())


def test_never_says_how_to_promote_by_hand(tmp_path: Path, checkpoints: list[Path]) -> None:
    async def scenario() -> None:
        promoter = ModelPromoter(ModelRegistry(tmp_path / "registry"), FakeEngine(None), "never")
        result = (await promoter.register_run(job(), checkpoints[0], {"test_accuracy": 0.1})).result
        assert not result.promoted
        assert result.reason == ("APP_PROMOTE=never: promote by hand with POST /admin/promote/"
                                 f"{result.model_version}")

    asyncio.run(scenario())


def test_the_service_log_says_whether_a_job_model_was_promoted(tmp_path: Path, checkpoints: list[Path],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> str:
        promoter = ModelPromoter(ModelRegistry(tmp_path / "registry"), FakeEngine(None), "if-better")
        return (await promoter.register_run(job(), checkpoints[0], {"test_accuracy": 0.1})).result.model_version

    with caplog.at_level("INFO", logger="app.control.promotion"):
        version = asyncio.run(scenario())
    assert f"job job1: promoted {version}: nothing with a known test accuracy was served" in caplog.messages


def fingerprinted(checkpoint: Path, test_set_sha256: str | None, accuracy: float) -> ModelCard:
    return read_card(checkpoint).model_copy(update={"test_set_sha256": test_set_sha256, "test_accuracy": accuracy})


def test_accuracies_on_other_test_images_are_not_compared(checkpoints: list[Path]) -> None:
    incumbent = fingerprinted(checkpoints[0], "a" * 64, 0.5)
    promote, reason = decide("if-better", 0.9, None, incumbent, "b" * 64)
    assert not promote
    assert "other test images" in reason and "aaaaaaaaaaaa" in reason and "POST /admin/promote/" in reason
    assert decide("if-better", 0.9, None, incumbent, "a" * 64) == (
        True, f"test accuracy 0.9000 >= 0.5000 of {incumbent.version}")
    assert not decide("if-better", 0.9, None, incumbent, None)[0]  # a run that cannot say what it was scored on
    assert decide("always", 0.1, None, incumbent, "b" * 64)[0]  # the policy that compares nothing


def test_a_card_from_before_fingerprints_is_not_replaced_by_itself(checkpoints: list[Path]) -> None:
    legacy = fingerprinted(checkpoints[0], None, 0.5)
    promote, reason = decide("if-better", 0.9, None, legacy, "a" * 64)
    assert not promote and "predates test-set fingerprints" in reason
    # One scored on part of the test set never counted, fingerprint or not.
    partial = legacy.model_copy(update={"training": {"test_limit": 100}})
    assert decide("if-better", 0.2, None, partial, "a" * 64)[0]


class HeldEngine(FakeEngine):
    """A swap that waits for the test to let it finish: a window for a second promotion to race into."""

    def __init__(self, card: ModelCard | None) -> None:
        super().__init__(card)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard:
        self.entered.set()
        await self.release.wait()
        return await super().swap(checkpoint, origin)


def test_promotions_from_two_processes_take_turns_and_compare_with_the_winner(tmp_path: Path) -> None:
    """Two promoters on one registry folder (as two replicas on a shared volume): each has its own in-process
    lock, so only the folder's file lock keeps the second from deciding against a stale incumbent."""
    better = make_checkpoint(tmp_path / "better", seed=20)  # 0.30
    good = make_checkpoint(tmp_path / "good", seed=10)  # 0.20
    incumbent = read_card(make_checkpoint(tmp_path / "served", seed=0))  # 0.10

    async def scenario() -> None:
        first_engine, second_engine = HeldEngine(incumbent), FakeEngine(incumbent)
        first = ModelPromoter(ModelRegistry(tmp_path / "registry"), first_engine, "if-better")
        second = ModelPromoter(ModelRegistry(tmp_path / "registry"), second_engine, "if-better")
        one = asyncio.create_task(first.register_run(job(), better, {"test_accuracy": 0.30}))
        await asyncio.wait_for(first_engine.entered.wait(), timeout=60)
        two = asyncio.create_task(second.register_run(job(), good, {"test_accuracy": 0.20}))
        await asyncio.sleep(0.3)  # give the second a chance to decide early, as it did before the lock
        assert not two.done() and second_engine.swapped == []
        first_engine.release.set()
        winner, loser = (await one).result, (await two).result
        assert winner.promoted and not loser.promoted
        assert loser.reason == f"test accuracy 0.2000 < 0.3000 of {winner.model_version}"
        assert first.registry.current() == winner.model_version

    asyncio.run(scenario())


def test_a_promotion_waits_for_the_lock_and_says_so_when_it_gives_up(tmp_path: Path, checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(checkpoints[0]).version
    holder = subprocess.Popen(  # another process, promoting
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(tmp_path / "registry" / "promotion.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        promoter = ModelPromoter(registry, FakeEngine(None), "always", lock_wait_s=0.2)
        with pytest.raises(PromotionBusy, match="another process has been promoting"):
            asyncio.run(promoter.promote(version))
        assert registry.current() is None
    finally:
        holder.communicate("")
    asyncio.run(promoter.promote(version))
    assert registry.current() == version


def test_a_swap_that_fails_for_any_reason_is_a_clear_error_and_changes_nothing(tmp_path: Path,
                                                                                checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(checkpoints[0]).version
    promoter = ModelPromoter(registry, FakeEngine(None, fail=True), "always")
    with pytest.raises(CheckpointError, match=f"could not serve {version}: RuntimeError: CUDA out of memory; "
                                              "still serving nothing"):
        asyncio.run(promoter.promote(version))
    assert registry.current() is None
