"""Promotion: registering a finished run's model and, by policy, making it the one the service answers with.

``APP_PROMOTE`` decides what a successful training job does with its model:

- ``if-better`` (default): promote when the new model's final-epoch test accuracy is at least the serving
  model's (always, when the serving model's accuracy is unknown or nothing is served yet);
- ``always``: promote every successful run;
- ``never``: only register it; an operator promotes by hand with ``POST /admin/promote/{version}``.

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
from app.control.registry import ModelRegistry, RegisteredModel
from model.checkpoint import ModelCard

logger = logging.getLogger(__name__)

PromotePolicy = Literal["if-better", "always", "never"]


class HotSwappable(Protocol):
    """What promotion needs from the inference engine."""

    @property
    def card(self) -> ModelCard | None: ...

    async def swap(self, checkpoint: Path, origin: str = "") -> ModelCard: ...


def should_promote(policy: PromotePolicy, candidate: float | None, serving: ModelCard | None) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    if serving is None or serving.test_accuracy is None:
        return True
    return candidate is not None and candidate >= serving.test_accuracy


class ModelPromoter:
    def __init__(self, registry: ModelRegistry, engine: HotSwappable, policy: PromotePolicy) -> None:
        self.registry = registry
        self.engine = engine
        self.policy = policy
        # One swap at a time, so a manual promotion and a finishing job cannot interleave swap and pointer.
        self._lock = asyncio.Lock()

    async def promote(self, version: str) -> RegisteredModel:
        """Serve ``version`` (raises ``UnknownVersion``), then point the registry at it."""
        registered = self.registry.get(version)
        async with self._lock:
            await self.engine.swap(Path(registered.path), origin=f"registry version {version}, promoted")
            self.registry.set_current(version)
        return registered

    async def register_run(self, job: Job, checkpoint: Path, final: dict[str, Any]) -> Conclusion:
        """The runner's success handler: register the run's checkpoint, then promote it by policy. A failed
        swap leaves the model registered and the pointer alone, and says so in the conclusion's error."""
        registered = await asyncio.to_thread(self.registry.register, checkpoint, source_job=job.id)
        accuracy = final.get("test_accuracy", registered.card.test_accuracy)
        promote = should_promote(self.policy, accuracy, self.engine.card)
        result = JobResult(model_version=registered.version, test_accuracy=accuracy, promoted=False)
        if not promote:
            return Conclusion(result)
        try:
            await self.promote(registered.version)
        except Exception as error:
            logger.exception("serving the newly registered %s failed", registered.version)
            return Conclusion(result, f"model {registered.version} was trained and registered, but serving it "
                                      f"failed: {error}; POST /admin/promote/{registered.version} retries")
        return Conclusion(result.model_copy(update={"promoted": True}))
