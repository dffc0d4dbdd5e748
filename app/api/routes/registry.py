"""``GET /models``: the model registry's versions, and which one this replica serves (promotion by hand is
``POST /admin/promote/{version}``, in ``admin.py``)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ControlPlaneDep, EngineDep
from app.api.schemas import ModelListing, ModelVersion

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelListing)
def list_models(control_plane: ControlPlaneDep, engine: EngineDep) -> ModelListing:
    """Every registered version, newest first; ``current`` is the registry's pointer, ``serving`` the version
    this replica answers with (they differ only for a moment after a promotion, or before any)."""
    registry = control_plane.registry
    current = registry.current()
    return ModelListing(current=current, serving=engine.version,
                        versions=[ModelVersion.of(m, current) for m in registry.versions()])
