"""``GET /models``: the model registry's versions, and which one this replica serves (promotion by hand is
``POST /admin/promote/{version}``, in ``admin.py``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.api.schemas import ModelListing, ModelVersion
from app.api.serving_deps import EngineDep, FollowerDep

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelListing)
async def list_models(follower: FollowerDep, engine: EngineDep) -> ModelListing:
    """Every registered version, newest first; ``current`` is the registry's pointer, ``serving`` the version
    this replica answers with (they differ only for a moment after a promotion, or before any)."""
    def read() -> tuple[str | None, list[ModelVersion]]:
        registry = follower.registry()
        current = registry.current()
        return current, [ModelVersion.of(m, current) for m in registry.versions()]

    current, versions = await asyncio.to_thread(read)  # a slow shared volume blocks a thread, not the loop
    return ModelListing(current=current, serving=engine.version, versions=versions)
