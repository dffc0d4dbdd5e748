"""``GET /model``: what is being served, on which device and backend (and why), with which batching settings,
calibration and request limits."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import SettingsDep
from app.api.errors import is_admin, redact_paths
from app.api.schemas import BatchingSettings, CalibrationInfo, ErrorResponse, ModelInfo, RequestLimits
from app.api.serving_deps import EngineDep
from app.engine.errors import NoModelLoaded

router = APIRouter(tags=["model"])


@router.get("/model", responses={503: {"model": ErrorResponse, "description": "no model loaded"}})
async def model_info(request: Request, engine: EngineDep, settings: SettingsDep) -> ModelInfo:
    """What is served. Absolute paths in ``origin`` and ``backend_reason`` are cut to their last part unless
    the caller sends the admin token."""
    served = engine.model
    if served is None:
        raise NoModelLoaded(engine.unavailable_reason)
    card = served.card
    admin = is_admin(request)

    def shown(text: str) -> str:
        return text if admin else redact_paths(text)

    return ModelInfo(
        version=card.version,
        architecture=card.architecture,
        class_names=list(card.class_names),
        parameter_count=card.parameter_count,
        test_accuracy=card.test_accuracy,
        trained_at=card.created_at,
        input_size=card.input_size,
        mean=list(card.mean),
        std=list(card.std),
        device=str(served.device),
        dtype=served.dtype,
        backend=served.backend,
        backend_reason=shown(served.backend_reason),
        backend_test_accuracy=served.verified_accuracy,
        origin=shown(served.origin),
        backend_verification=getattr(request.app.state, "backend_verification", None) and
        request.app.state.backend_verification.status,
        batching=BatchingSettings(
            max_batch_size=engine.max_batch_size,
            max_batch_delay_ms=engine.max_batch_delay_s * 1000,
            max_queue=engine.max_queue,
            parallel_batches=engine.parallel_batches,
            request_timeout_s=settings.request_timeout_s,
        ),
        calibration=None if card.calibration is None else CalibrationInfo.of(
            card.calibration, applied=settings.calibration == "on"),
        limits=RequestLimits(
            max_upload_bytes=settings.max_upload_bytes,
            max_batch_files=settings.max_batch_files,
            max_image_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
            max_queue=engine.max_queue,
            max_json_bytes=settings.max_json_bytes,
        ),
    )
