"""Promotion: registering a finished run's model and, by policy, making it the one the service answers with.

``APP_PROMOTE`` decides what a successful training job does with its model:

- ``if-better`` (default): promote when the new model's final-epoch test accuracy is at least that of the
  registry's current version (of the serving model, before anything was promoted; always, when that
  accuracy is unknown or nothing is served yet);
- ``always``: promote every successful run;
- ``never``: only register it; an operator promotes by hand with ``POST /admin/promote/{version}``.

Neither policy promotes on its own a run scored on part of the test set (``test_limit``): one test image can
score 1.0. ``train_limit`` alone is fine, the score is honest, only low. Such a run is registered; the job's
``result.reason`` says why it was or was not promoted.

Like with like: every card records a fingerprint of the exact test images and labels its accuracy was
measured on (``ModelCard.test_set_sha256``), and ``if-better`` compares two accuracies only when the
fingerprints are equal. A run scored on other test images (another copy of the data, a subset) is registered,
not promoted, and the reason says so. A card written before fingerprints existed (the shipped checkpoints
under weights/) cannot show which images it was scored on, so it is treated the same way: a run does not
replace it by itself, whatever the two numbers say, because a comparison that may be between different test
sets is no evidence; an operator promotes the first fingerprinted model by hand (``POST /admin/promote``), and
from then on every comparison is between fingerprints. (``always`` promotes regardless, as it always did.)

One promotion at a time, across processes: the incumbent is read, compared and replaced under the registry's
promotion lock (``registry.PromotionLock``, a ``flock`` on the shared folder), so two replicas finishing or
promoting together cannot both decide against the same incumbent or interleave swap and pointer.

Promoting hot-swaps the engine first and moves the registry's ``current`` pointer only once the new model
serves, so the pointer never names a model that failed to load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from app.control.jobs.runner import Conclusion
from app.control.jobs.schemas import Job, JobResult
from app.control.registry import ModelRegistry, RegisteredModel, RegistryError, UnknownVersion
from model.card import CheckpointError, ModelCard
from model.labels import TEST_IMAGES

logger = logging.getLogger(__name__)

PromotePolicy = Literal["if-better", "always", "never"]
# Longest wait for another process's promotion (a hot swap: seconds; its own timeout bounds it).
PROMOTION_LOCK_WAIT_S = 300.0


class SwapFailed(CheckpointError):
    """The engine could not serve the version (its load or warm-up failed); the old model still serves and
    the registry's pointer is unchanged."""


class HotSwappable(Protocol):
    """What promotion needs from the inference engine."""

    @property
    def card(self) -> ModelCard | None: ...

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard: ...


def should_promote(policy: PromotePolicy, candidate: float | None, serving: ModelCard | None,
                   candidate_test_set: str | None = None) -> bool:
    return decide(policy, candidate, TEST_IMAGES, serving, candidate_test_set)[0]


def decide(policy: PromotePolicy, candidate: float | None, test_images: int | None,
           incumbent: ModelCard | None, candidate_test_set: str | None = None) -> tuple[bool, str]:
    """Whether to promote a run scoring ``candidate`` over ``incumbent``, and why, in a sentence for the job's
    result; ``test_images``: how many test images a run with a ``test_limit`` was scored on, else None;
    ``candidate_test_set``: the fingerprint of the images it was scored on (its card's ``test_set_sha256``)."""
    if policy == "never":
        return False, "APP_PROMOTE=never: promote by hand with POST /admin/promote/{version}"
    if test_images is not None and test_images < TEST_IMAGES:
        return False, (f"scored on {test_images} of the {TEST_IMAGES} test images (test_limit), which does not "
                       "compare with a full-test-set accuracy; promote by hand with POST /admin/promote/{version}")
    if policy == "always":
        return True, "APP_PROMOTE=always"
    if incumbent is None or incumbent.test_accuracy is None:
        return True, "nothing with a known test accuracy was served"
    if candidate is None:
        return False, "the run reported no test accuracy"
    by_hand = "; promote by hand with POST /admin/promote/{version}"
    theirs = incumbent.test_set_sha256
    if theirs is None:
        if _partial_test_set(incumbent):
            return True, (f"{incumbent.version} was scored on part of the test set, so its "
                          f"{incumbent.test_accuracy:.4f} does not count")
        return False, (f"{incumbent.version}'s card does not record which test images its "
                       f"{incumbent.test_accuracy:.4f} was measured on (it predates test-set fingerprints), so "
                       f"this run's {candidate:.4f} may not compare with it{by_hand}")
    if candidate_test_set is None:
        return False, f"this run's card does not record which test images it was scored on{by_hand}"
    if candidate_test_set != theirs:
        return False, (f"scored on other test images than {incumbent.version} (test-set fingerprint "
                       f"{candidate_test_set[:12]} against {theirs[:12]}), so {candidate:.4f} and "
                       f"{incumbent.test_accuracy:.4f} do not compare{by_hand}")
    if candidate >= incumbent.test_accuracy:
        return True, f"test accuracy {candidate:.4f} >= {incumbent.test_accuracy:.4f} of {incumbent.version}"
    return False, f"test accuracy {candidate:.4f} < {incumbent.test_accuracy:.4f} of {incumbent.version}"


def _partial_test_set(card: ModelCard) -> bool:
    limit = card.training.get("test_limit")
    return isinstance(limit, int) and limit < TEST_IMAGES


class ModelPromoter:
    def __init__(self, registry: ModelRegistry, engine: HotSwappable, policy: PromotePolicy,
                 lock_wait_s: float = PROMOTION_LOCK_WAIT_S) -> None:
        self.registry = registry
        self.engine = engine
        self.policy = policy
        self.lock_wait_s = lock_wait_s
        # One swap at a time in this process; the registry's file lock does the same among processes.
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def _serialised(self) -> AsyncIterator[None]:
        async with self._lock:
            lock = self.registry.promotion_lock()
            await asyncio.to_thread(lock.acquire, self.lock_wait_s)  # raises PromotionBusy
            try:
                yield
            finally:
                lock.release()

    async def promote(self, version: str, origin: str = "") -> RegisteredModel:
        """Serve ``version`` (raises ``UnknownVersion``), then point the registry at it."""
        registered = await asyncio.to_thread(self.registry.get, version)
        async with self._serialised():
            await self._swap_and_point(registered, origin)
        return registered

    async def _swap_and_point(self, registered: RegisteredModel, origin: str = "") -> None:
        """Under the promotion lock: serve, then move the pointer. A swap that fails for any reason leaves the
        old model serving and the pointer alone, and says so as a ``CheckpointError`` (a clear answer to the
        admin call, not a 500)."""
        version = registered.version
        try:
            await self.engine.swap(Path(registered.path), origin=origin or f"registry version {version}, promoted")
        except CheckpointError:
            raise
        except Exception as error:
            serving = self.engine.card.version if self.engine.card is not None else "nothing"
            raise SwapFailed(f"could not serve {version}: {type(error).__name__}: {error}; still serving "
                             f"{serving}, and the registry's current version is unchanged") from error
        await asyncio.to_thread(self.registry.set_current, version)

    async def serve_checkpoint(self, checkpoint: Path, origin: str) -> RegisteredModel:
        """Register a checkpoint directory (raises ``CheckpointError``), then serve and point at it."""
        registered = await asyncio.to_thread(self.registry.register, checkpoint)
        return await self.promote(registered.version, origin=origin)

    async def register_run(self, job: Job, checkpoint: Path, final: dict[str, Any]) -> Conclusion:
        """The runner's success handler: register the run's checkpoint, then promote it by policy. The
        incumbent is read, compared and replaced under the promotion lock. A failed swap leaves the model
        registered and the pointer alone, and says so in the conclusion's error."""
        registered = await asyncio.to_thread(self.registry.register, checkpoint, source_job=job.id)
        accuracy = final.get("test_accuracy", registered.card.test_accuracy)
        # Only a test_limit makes a score partial: a run on a smaller data set (the tests' synthetic one)
        # is scored on all of its test images.
        limit = job.params.model_dump().get("test_limit") if job.params is not None else None
        test_images = None if limit is None else final.get("test_images", limit)
        async with self._serialised():
            incumbent = await asyncio.to_thread(self._incumbent)
            promote, reason = decide(self.policy, accuracy, test_images, incumbent, registered.card.test_set_sha256)
            result = JobResult(model_version=registered.version, test_accuracy=accuracy, promoted=False,
                               reason=reason.replace("{version}", registered.version))
            if not promote:
                logger.info("job %s: registered %s, not promoted: %s", job.id, registered.version, result.reason)
                return Conclusion(result)
            try:
                await self._swap_and_point(registered)
            except Exception as error:
                logger.exception("serving the newly registered %s failed", registered.version)
                return Conclusion(result, f"model {registered.version} was trained and registered, but serving "
                                          f"it failed: {error}; POST /admin/promote/{registered.version} retries")
        logger.info("job %s: promoted %s: %s", job.id, registered.version, result.reason)
        return Conclusion(result.model_copy(update={"promoted": True}))

    def _incumbent(self) -> ModelCard | None:
        """The card to beat: the registry's current version (what every replica serves), else the one this
        replica serves (the shipped default or APP_WEIGHTS, before anything was promoted)."""
        try:
            current = self.registry.current()
        except (RegistryError, OSError) as error:
            logger.warning("the registry's current pointer cannot be read (%s); comparing with the served model",
                           error)
            return self.engine.card
        if current is not None:
            try:
                return self.registry.get(current).card
            except (UnknownVersion, CheckpointError, OSError):
                logger.warning("the registry's current %s cannot be read; comparing with the served model", current)
        return self.engine.card
