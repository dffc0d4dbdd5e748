"""``POST /predict`` (one image) and ``POST /predict/batch`` (several): read the upload, hand its bytes to the
classification pipeline (``app/classification/classifier.py``)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app.api.clients import client_id
from app.api.deps import SettingsDep
from app.api.disconnects import unless_disconnected
from app.api.errors import BadRequest, PayloadTooLarge
from app.api.schemas import BatchPrediction, ErrorResponse
from app.api.serving_deps import ClassifierDep
from app.api.uploads import check_pixel_budget, read_images
from app.classification.answers import Prediction
from app.config import Settings

router = APIRouter(tags=["predict"])

TopK = Annotated[int, Query(ge=1, le=10, description="how many of the most probable classes to list")]

_BINARY = {"type": "string", "format": "binary", "minLength": 1}
# additionalProperties: false, since a body of more than a few other fields is refused (app/api/uploads.py).
SINGLE_IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": _BINARY},
                                       "additionalProperties": False}},
    "image/png": {"schema": _BINARY},
    "image/jpeg": {"schema": _BINARY},
}}}
# maxItems is APP_MAX_BATCH_FILES, written in by app/api/openapi.py.
_BATCH_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "additionalProperties": False,
                                       "properties": {"files": {"type": "array", "items": _BINARY, "minItems": 1}}}},
}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "no file, or an empty one"},
    413: {"model": ErrorResponse, "description": "too many bytes, pixels or files"},
    415: {"model": ErrorResponse, "description": "not a supported, decodable image"},
    503: {"model": ErrorResponse, "description": "no model loaded, or the queue is full (see Retry-After)"},
    504: {"model": ErrorResponse, "description": "no answer within APP_REQUEST_TIMEOUT_S"},
}


def one_file_only(_: int) -> Exception:
    return BadRequest("send one image per request, in field 'file'; "
                      "POST several to /predict/batch in the repeated field 'files'")


def _too_many_files(limit: int) -> Exception:
    return PayloadTooLarge(f"more than {limit} files in one request (APP_MAX_BATCH_FILES); split the upload")


@router.post("/predict", responses=ERRORS, openapi_extra=SINGLE_IMAGE_BODY)
async def predict(request: Request, classifier: ClassifierDep, settings: SettingsDep, top_k: TopK = 3) -> Prediction:
    """Classify one image, sent as multipart field ``file`` or as a raw body with an ``image/*`` Content-Type."""
    deadline = time.monotonic() + settings.request_timeout_s
    uploads = await read_images(request, field="file", max_files=1, limit=settings.max_upload_bytes,
                                allow_raw=True, too_many=one_file_only)
    (prediction,) = await unless_disconnected(request, classifier.classify(
        [upload.data for upload in uploads], deadline=deadline, top_k=top_k, client=client_of(request, settings)))
    return prediction


@router.post("/predict/batch", responses=ERRORS, openapi_extra=_BATCH_BODY)
async def predict_batch(request: Request, classifier: ClassifierDep, settings: SettingsDep,
                        top_k: TopK = 3) -> BatchPrediction:
    """Classify up to ``APP_MAX_BATCH_FILES`` images sent in the repeated multipart field ``files``."""
    deadline = time.monotonic() + settings.request_timeout_s
    uploads = await read_images(request, field="files", max_files=settings.max_batch_files,
                                limit=settings.max_upload_bytes, allow_raw=False, too_many=_too_many_files)
    await check_pixel_budget(uploads, settings.max_request_pixels)
    predictions = await unless_disconnected(request, classifier.classify(
        [upload.data for upload in uploads], deadline=deadline, top_k=top_k, client=client_of(request, settings)))
    return BatchPrediction(predictions=predictions)


def client_of(request: Request, settings: Settings) -> str | None:
    """Who sent the request, for APP_MAX_CLIENT_IMAGES (``app/api/clients.py``)."""
    named = request.headers.get(settings.client_id_header) if settings.client_id_header else None
    return client_id(named, request.client.host if request.client else None, settings)
