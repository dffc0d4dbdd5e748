"""``POST /explain``: the prediction for one image and a Grad-CAM heat map of what made it
(``app/classification/explanations.py``), as a PNG or, with ``?format=json``, as JSON with the PNG in base64.

The same inputs and limits as ``/predict`` (multipart ``file`` or a raw ``image/*`` body, APP_MAX_UPLOAD_BYTES,
APP_MAX_IMAGE_PIXELS). A free explain slot is checked before the upload is read and taken after it is, so a
slow upload holds none.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.api.deps import SettingsDep
from app.api.routes.predict import ERRORS, SINGLE_IMAGE_BODY, TopK, one_file_only
from app.api.schemas import ExplanationResponse
from app.api.serving_deps import ExplainerDep
from app.api.uploads import read_images
from app.classification.explanations import Explanation

router = APIRouter(tags=["explain"])

ClassName = Annotated[str | None, Query(alias="class", description="the class to explain, by label (car, cat...); "
                                        "default: the predicted class")]
Format = Annotated[Literal["png", "json"], Query(description="png: the heat map itself, the prediction in "
                                                 "X-Prediction-* headers; json: both in one JSON body")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ExplanationResponse, "description": "the heat map: an 8-bit grayscale PNG at the model's "
          "input size (32x32), or JSON with ?format=json",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    **ERRORS,
    400: {**ERRORS[400], "description": "no file, an empty one, or a class the model does not have"},
    503: {**ERRORS[503], "description": "no model loaded, or every explain slot is busy "
          "(APP_EXPLAIN_CONCURRENCY; see Retry-After)"},
}


@router.post("/explain", responses=_RESPONSES, openapi_extra=SINGLE_IMAGE_BODY, response_class=Response)
async def explain(request: Request, explainer: ExplainerDep, settings: SettingsDep, top_k: TopK = 3,
                  class_name: ClassName = None, format: Format = "png") -> Response:
    """Classify one image and show, as a Grad-CAM heat map (Selvaraju et al. 2017), where the evidence for
    the predicted class (or ``?class=``) lies."""
    explainer.check_free()
    uploads = await read_images(request, field="file", max_files=1, limit=settings.max_upload_bytes,
                                allow_raw=True, too_many=one_file_only)
    with explainer.slot():
        explanation = await explainer.explain(uploads[0].data, class_name=class_name, top_k=top_k)
    if format == "json":
        return Response(_json(explanation).model_dump_json(), media_type="application/json")
    return Response(explanation.heatmap_png, media_type="image/png", headers=_headers(explanation))


def _json(explanation: Explanation) -> ExplanationResponse:
    return ExplanationResponse(
        prediction=explanation.prediction, explained_class=explanation.explained_label,
        explained_index=explanation.explained_index, layer=explanation.layer,
        heatmap_width=explanation.size, heatmap_height=explanation.size,
        heatmap_png_base64=base64.b64encode(explanation.heatmap_png).decode("ascii"))


def _headers(explanation: Explanation) -> dict[str, str]:
    prediction = explanation.prediction
    return {
        "X-Prediction-Label": prediction.label,
        "X-Prediction-Confidence": repr(prediction.confidence),
        "X-Prediction-In-Distribution": _json_value(prediction.in_distribution),
        "X-Prediction-OOD-Score": _json_value(prediction.ood_score),
        "X-Explained-Class": explanation.explained_label,
        "X-Model-Version": prediction.model_version,
    }


def _json_value(value: bool | float | None) -> str:
    """As JSON writes it: true, false, null or the number."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
