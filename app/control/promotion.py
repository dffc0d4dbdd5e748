"""Promotion: registering a finished run's model and, by policy, making it the one the service answers with.

``APP_PROMOTE`` decides what a successful training job does with its model:

- ``if-better`` (default): promote when the new model's final-epoch test accuracy is at least that of the
  registry's current version (of the serving model, before anything was promoted; always, when that
  accuracy is unknown or nothing is served yet);
- ``always``: promote every successful run;
- ``never``: only register it; an operator promotes by hand with ``POST /admin/promote/{version}``.

Neither policy promotes on its own a run scored on part of the test set (``test_limit``): one test image can
score 1.0, and accuracies on different test sets do not compare. ``train_limit`` alone is fine, the score is
honest, only low. Such a run is registered; the job's ``result.reason`` says why it was or was not promoted.

Promoting hot-swaps the engine first and moves the registry's ``current`` pointer only once the new model
serves, so the pointer never names a model that failed to load.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal, Protocol

from app.control.jobs.runner import Conclusion
from app.control.jobs.schemas import Job, JobResult
from app.control.registry import ModelRegistry, RegisteredModel, UnknownVersion
from model.checkpoint import CheckpointError, ModelCard
from model.labels import TEST_IMAGES

logger = logging.getLogger(__name__)

PromotePolicy = Literal["if-better", "always", "never"]


class HotSwappable(Protocol):
    """What promotion needs from the inference engine."""

    @property
    def card(self) -> ModelCard | None: ...

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard: ...


def should_promote(policy: PromotePolicy, candidate: float | None, serving: ModelCard | None) -> bool:
    return decide(policy, candidate, TEST_IMAGES, serving)[0]


def decide(policy: PromotePolicy, candidate: float | None, test_images: int | None,
           incumbent: ModelCard | None) -> tuple[bool, str]:
    """Whether to promote a run scoring ``candidate`` over ``incumbent``, and why, in a sentence for the job's
    result; ``test_images``: how many test images a run with a ``test_limit`` was scored on, else None."""
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
    if _partial_test_set(incumbent):
        return True, (f"{incumbent.version} was scored on part of the test set, so its "
                      f"{incumbent.test_accuracy:.4f} does not count")
    if candidate >= incumbent.test_accuracy:
        return True, f"test accuracy {candidate:.4f} >= {incumbent.test_accuracy:.4f} of {incumbent.version}"
    return False, f"test accuracy {candidate:.4f} < {incumbent.test_accuracy:.4f} of {incumbent.version}"


def _partial_test_set(card: ModelCard) -> bool:
    limit = card.training.get("test_limit")
    return isinstance(limit, int) and limit < TEST_IMAGES


class ModelPromoter:
    def __init__(self, registry: ModelRegistry, engine: HotSwappable, policy: PromotePolicy) -> None:
        self.registry = registry
        self.engine = engine
        self.policy = policy
        # One swap at a time, so a manual promotion and a finishing job cannot interleave swap and pointer.
        self._lock = asyncio.Lock()

    async def promote(self, version: str, origin: str = "") -> RegisteredModel:
        """Serve ``version`` (raises ``UnknownVersion``), then point the registry at it."""
        registered = self.registry.get(version)
        async with self._lock:
            await self.engine.swap(Path(registered.path), origin=origin or f"registry version {version}, promoted")
            await asyncio.to_thread(self.registry.set_current, version)
        return registered

    async def serve_checkpoint(self, checkpoint: Path, origin: str) -> RegisteredModel:
        """Register a checkpoint directory (raises ``CheckpointError``), then serve and point at it."""
        registered = await asyncio.to_thread(self.registry.register, checkpoint)
        return await self.promote(registered.version, origin=origin)

    async def register_run(self, job: Job, checkpoint: Path, final: dict[str, Any]) -> Conclusion:
        """The runner's success handler: register the run's checkpoint, then promote it by policy. A failed
        swap leaves the model registered and the pointer alone, and says so in the conclusion's error."""
        registered = await asyncio.to_thread(self.registry.register, checkpoint, source_job=job.id)
        accuracy = final.get("test_accuracy", registered.card.test_accuracy)
        # Only a test_limit makes a score partial: a run on a smaller data set (the tests' synthetic one)
        # is scored on all of its test images.
        limit = job.params.model_dump().get("test_limit") if job.params is not None else None
        test_images = None if limit is None else final.get("test_images", limit)
        promote, reason = decide(self.policy, accuracy, test_images, await asyncio.to_thread(self._incumbent))
        result = JobResult(model_version=registered.version, test_accuracy=accuracy, promoted=False,
                           reason=reason.replace("{version}", registered.version))
        if not promote:
            logger.info("job %s: registered %s, not promoted: %s", job.id, registered.version, result.reason)
            return Conclusion(result)
        try:
            await self.promote(registered.version)
        except Exception as error:
            logger.exception("serving the newly registered %s failed", registered.version)
            return Conclusion(result, f"model {registered.version} was trained and registered, but serving it "
                                      f"failed: {error}; POST /admin/promote/{registered.version} retries")
        logger.info("job %s: promoted %s: %s", job.id, registered.version, result.reason)
        return Conclusion(result.model_copy(update={"promoted": True}))

    def _incumbent(self) -> ModelCard | None:
        """The card to beat: the registry's current version (what every replica serves), else the one this
        replica serves (the shipped default or APP_WEIGHTS, before anything was promoted)."""
        current = self.registry.current()
        if current is not None:
            try:
                return self.registry.get(current).card
            except (UnknownVersion, CheckpointError, OSError):
                logger.warning("the registry's current %s cannot be read; comparing with the served model", current)
        return self.engine.card
