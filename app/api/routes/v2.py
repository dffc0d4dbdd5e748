"""The KServe v2 / Open Inference Protocol (REST, JSON tensors), so Triton and KServe clients work unchanged.

Spec: https://github.com/kserve/open-inference-protocol (specification/protocol/inference_rest.md).
The model is served under the name ``APP_MODEL_NAME``, by default its architecture (``fastcnn`` for the
shipped checkpoint); its version is the card's ``.version``, and ``/versions/<v>`` paths answer 404 for any
version but the one serving.

One input tensor per request, either ``UINT8 [N, 32, 32, 3]`` raw RGB pixels (normalised by the server with
the card's mean and std) or ``FP32 [N, 3, 32, 32]`` already normalised; ``data`` flat (row-major) or nested.
The output ``probabilities`` is ``FP32 [N, 10]`` (calibrated as ``/predict``'s are); requesting it with the
parameter ``{"classification": k}`` (Triton's classification extension) returns ``BYTES [N, k]`` strings
``"<probability>:<index>:<label>"`` instead. A model whose card has a calibration has two more outputs:
``in_distribution``, ``BOOL [N]``, and ``ood_score``, ``FP32 [N]``, as in ``/predict``'s answer (the score's
kind and threshold are in ``GET /model``); a model without one has neither, so a BOOL tensor never needs a
null. A request without ``outputs`` gets every output, one with ``outputs`` gets those it names. Binary
tensor data (Triton's binary extension) is not supported: use JSON (``binary_data=False`` in tritonclient).
Errors are ``{"error": "..."}``.

A JSON body costs far more memory parsed than sent (an 8 MiB one peaked at +192 MiB), so the body is
refused before parsing when it holds more values than the largest request (``APP_MAX_BATCH_FILES`` images)
can: a JSON array separates its values with commas, and counting those is cheap.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic.json_schema import JsonDict

from app import __version__
from app.api.deps import ClassifierDep, EngineDep, SettingsDep
from app.api.errors import BadRequest, NotFound, PayloadTooLarge
from app.api.uploads import read_body
from app.classification.probabilities import AssessedOutput
from app.config import Settings
from app.engine.engine import InferenceEngine
from app.engine.errors import NoModelLoaded
from app.engine.served_model import ServedModel
from model.checkpoint import ModelCard

OUTPUT_NAME = "probabilities"
IN_DISTRIBUTION = "in_distribution"
OOD_SCORE = "ood_score"
TRUST_OUTPUTS = (IN_DISTRIBUTION, OOD_SCORE)
# Commas a request may hold besides those between its tensor's values: ids, parameters and outputs.
OTHER_COMMAS = 1024
router = APIRouter(prefix="/v2", tags=["kserve-v2"])


OUTPUT_NAME = "probabilities"


# The protocol's parameters are strings, numbers and booleans; parsed strictly, so what the schema calls
# invalid (a number in a string, a boolean for a number) is refused rather than coerced.
Parameters = dict[str, StrictStr | StrictInt | StrictFloat | StrictBool]
_STRICT = ConfigDict(strict=True)


class RequestInput(BaseModel):
    model_config = _STRICT
    # The schema's constraints are the documented ones; the checks that say what to send instead are _parse's.
    name: str
    shape: list[int] = Field(description="[N, 32, 32, 3] for UINT8, [N, 3, 32, 32] for FP32",
                             json_schema_extra={"minItems": 4, "maxItems": 4,
                                                "items": {"type": "integer", "minimum": 1}})
    datatype: str = Field(json_schema_extra={"enum": ["UINT8", "FP32"]})
    parameters: Parameters | None = None
    data: list[int | float | list[Any]] = Field(
        description="the product of shape's values, flat in row-major order (nested to the shape is accepted "
        "too); UINT8 integers 0-255, or finite FP32 numbers", json_schema_extra={"minItems": 1,
                                                                                  "items": {"type": "number"}})


_JSON_ONLY: JsonDict = {"type": "boolean", "enum": [False]}  # Triton's binary extension is not supported


class RequestOutput(BaseModel):
    model_config = _STRICT
    name: str = Field(json_schema_extra={"enum": [OUTPUT_NAME]})
    parameters: Parameters | None = Field(None, json_schema_extra={"properties": {
        "classification": {"type": "integer", "minimum": 1, "maximum": 10}, "binary_data": _JSON_ONLY}})


class InferenceRequest(BaseModel):
    model_config = _STRICT
    id: str | None = None
    parameters: Parameters | None = Field(None, json_schema_extra={"properties": {
        "binary_data_output": _JSON_ONLY}})
    inputs: list[RequestInput] = Field(min_length=1, json_schema_extra={"maxItems": 1})
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ErrorObject(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorObject} for code in (400, 404, 413, 503, 504)}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` substituted in place, for use inside ``openapi_extra``."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


# One 32x32 grey image: schemathesis's examples phase sends it, so the fuzzing reaches a 200 too.
_EXAMPLE = {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [128] * 3072}]}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline_refs(InferenceRequest.model_json_schema()), "example": _EXAMPLE}}}}


@router.get("")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="cifar-serve", version=__version__, extensions=["classification"])


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={503: {"model": ErrorObject}})
async def ready(engine: EngineDep) -> dict[str, bool]:
    if not engine.ready:
        raise NoModelLoaded(f"not ready: {engine.unavailable_reason}")
    return {"ready": True}


@router.get("/models/{model_name}", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}", responses=ERRORS)
async def model_metadata(engine: EngineDep, settings: SettingsDep, model_name: str,
                         model_version: str | None = None) -> ModelMetadata:
    served = _served(engine, settings, model_name, model_version)
    size, classes = served.card.input_size, len(served.card.class_names)
    return ModelMetadata(
        name=model_name,
        versions=[served.card.version],
        platform="pytorch",
        inputs=[MetadataTensor(name="pixels", datatype="UINT8", shape=[-1, size, size, 3]),
                MetadataTensor(name="normalized", datatype="FP32", shape=[-1, 3, size, size])],
        outputs=[MetadataTensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, classes]),
                 *([MetadataTensor(name=IN_DISTRIBUTION, datatype="BOOL", shape=[-1]),
                    MetadataTensor(name=OOD_SCORE, datatype="FP32", shape=[-1])] if served.card.calibration else [])],
    )


@router.get("/models/{model_name}/ready", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}/ready", responses=ERRORS)
async def model_ready(engine: EngineDep, settings: SettingsDep, model_name: str,
                      model_version: str | None = None) -> dict[str, Any]:
    _served(engine, settings, model_name, model_version)
    return {"name": model_name, "ready": engine.ready}


@router.post("/models/{model_name}/infer", responses=ERRORS, openapi_extra=_INFER_BODY)
@router.post("/models/{model_name}/versions/{model_version}/infer", responses=ERRORS, openapi_extra=_INFER_BODY)
async def infer(request: Request, engine: EngineDep, classifier: ClassifierDep, settings: SettingsDep,
                model_name: str, model_version: str | None = None) -> InferenceResponse:
    """The classification pipeline (``app/classification/classifier.py``), with this protocol's own decode
    stage (JSON tensors, ``_parse``) and response (``_encode``)."""
    deadline = time.monotonic() + settings.request_timeout_s
    served = _served(engine, settings, model_name, model_version)
    if "inference-header-content-length" in request.headers:
        raise BadRequest("binary tensor data is not supported: send the tensors as JSON (binary_data=False)")
    body = await read_body(request, settings.max_upload_bytes)
    decode = functools.partial(_parse, body, max_images=settings.max_batch_files, card=served.card)
    parsed, result = await classifier.classify_tensors(decode, deadline=deadline)
    if model_version is not None and result.card.version != model_version:
        raise NotFound(f"version {model_version} was swapped out while this request waited; "
                       f"the model now serving is {result.card.version}")
    return _encode(parsed, result, model_name)


def _encode(parsed: _ParsedRequest, result: AssessedOutput, model_name: str) -> InferenceResponse:
    outputs: list[ResponseOutput] = []
    if OUTPUT_NAME in parsed.outputs:
        outputs.append(_probabilities(result, parsed.classification))
    # A model swapped in while the request waited may lack a calibration the parsed request relied on.
    if IN_DISTRIBUTION in parsed.outputs and result.in_distribution is not None:
        outputs.append(ResponseOutput(name=IN_DISTRIBUTION, shape=[len(result)], datatype="BOOL",
                                      data=result.in_distribution.tolist()))
    if OOD_SCORE in parsed.outputs and result.ood_scores is not None:
        outputs.append(ResponseOutput(name=OOD_SCORE, shape=[len(result)], datatype="FP32",
                                      data=result.ood_scores.tolist()))
    return InferenceResponse(model_name=model_name, model_version=result.card.version, id=parsed.id,
                             outputs=outputs)


def _probabilities(result: AssessedOutput, classification: int | None) -> ResponseOutput:
    probabilities = result.probabilities
    if classification:
        names = result.card.class_names
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :classification]
        data = [f"{float(row[i])}:{i}:{names[i]}" for row, indices in zip(probabilities, order) for i in indices]
        return ResponseOutput(name=OUTPUT_NAME, shape=list(order.shape), datatype="BYTES", data=data)
    return ResponseOutput(name=OUTPUT_NAME, shape=list(probabilities.shape), datatype="FP32",
                          data=probabilities.ravel().tolist())


def served_model_name(settings: Settings, served: ServedModel) -> str:
    """The model's name in this protocol: APP_MODEL_NAME, else the architecture of the model serving."""
    return settings.model_name or served.card.architecture


def _served(engine: InferenceEngine, settings: Settings, model_name: str, model_version: str | None) -> ServedModel:
    served = engine.model
    if served is None:
        raise NoModelLoaded(engine.unavailable_reason)
    if model_name != (name := served_model_name(settings, served)):
        raise NotFound(f"unknown model {model_name!r}: this server serves {name!r}")
    if model_version is not None and model_version != served.card.version:
        raise NotFound(f"model version {model_version!r} is not served; {served.card.version} is")
    return served


@dataclass(frozen=True)
class _ParsedRequest:
    id: str | None
    inputs: list[np.ndarray]
    classification: int | None
    outputs: tuple[str, ...]  # the names to answer with, in the model's order


def _parse(body: bytes, size: int, *, max_images: int, card: ModelCard) -> _ParsedRequest:
    """Validate an inference request and turn its tensor into per-image arrays of side ``size`` (the decode
    stage of this protocol; the classifier runs it on its decode threads)."""
    most_values = max_images * 3 * size * size
    if body.count(b",") > most_values + OTHER_COMMAS:
        raise PayloadTooLarge(f"the request holds more values than {max_images} images (APP_MAX_BATCH_FILES) of "
                              f"{3 * size * size} values each; send at most {max_images} per request")
    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as error:
        found = error.errors()
        if any("data" in problem["loc"] for problem in found):
            raise BadRequest("the input's data must be numbers (not strings or booleans), flat or nested to the "
                             "shape") from None
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}" for p in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise BadRequest(f"not a v2 inference request: {problems}{more}") from None
    if len(request.inputs) != 1:
        raise BadRequest(f"this model takes one input tensor: UINT8 [N, {size}, {size}, 3] pixels or "
                         f"FP32 [N, 3, {size}, {size}] normalised; got {len(request.inputs)}")
    tensor = request.inputs[0]
    layouts = {"UINT8": [size, size, 3], "FP32": [3, size, size]}
    if tensor.datatype not in layouts:
        raise BadRequest(f"input {tensor.name!r} has datatype {tensor.datatype}; send UINT8 [N, {size}, {size}, 3] "
                         f"pixels or FP32 [N, 3, {size}, {size}] normalised")
    if len(tensor.shape) != 4 or tensor.shape[1:] != layouts[tensor.datatype] or tensor.shape[0] < 1:
        raise BadRequest(f"input {tensor.name!r} ({tensor.datatype}) must have shape "
                         f"[N, {', '.join(map(str, layouts[tensor.datatype]))}] with N >= 1; got {tensor.shape}")
    if tensor.shape[0] > max_images:
        raise PayloadTooLarge(f"{tensor.shape[0]} images in one request; at most {max_images} (APP_MAX_BATCH_FILES)")
    try:
        values = np.asarray(tensor.data, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest(f"input {tensor.name!r}: data must be numbers, flat or nested to the shape") from None
    if values.size != math.prod(tensor.shape):
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, "
                         f"data has {values.size}")
    values = values.reshape(tensor.shape)
    if tensor.datatype == "UINT8":
        if not (np.all(values >= 0) and np.all(values <= 255) and np.all(values == np.floor(values))):
            raise BadRequest(f"input {tensor.name!r}: UINT8 values must be integers from 0 to 255")
        images = values.astype(np.uint8)
    else:
        if not np.all(np.isfinite(values)):
            raise BadRequest(f"input {tensor.name!r}: FP32 values must be finite")
        images = values.astype(np.float32)
    outputs, classification = _outputs(request, card)
    return _ParsedRequest(request.id, list(images), classification, outputs)


def _outputs(request: InferenceRequest, card: ModelCard) -> tuple[tuple[str, ...], int | None]:
    """The outputs to answer with, and the classification count asked of ``probabilities``, if any."""
    if request.parameters and request.parameters.get("binary_data_output"):
        raise BadRequest("binary output is not supported: request JSON outputs (binary_data=False)")
    known = (OUTPUT_NAME, *TRUST_OUTPUTS) if card.calibration else (OUTPUT_NAME,)
    classes = len(card.class_names)
    count = None
    for output in request.outputs or []:
        if output.name not in known:
            why = (" (this model's card has no calibration, so it has no OOD outputs)"
                   if output.name in TRUST_OUTPUTS else "")
            raise BadRequest(f"unknown output {output.name!r}{why}: this model's outputs are {', '.join(known)}")
        parameters = output.parameters or {}
        if parameters.get("binary_data"):
            raise BadRequest("binary output is not supported: request JSON outputs (binary_data=False)")
        if "classification" in parameters:
            if output.name != OUTPUT_NAME:
                raise BadRequest(f"classification applies to the {OUTPUT_NAME!r} output only, not {output.name!r}")
            value = parameters["classification"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= classes:
                raise BadRequest(f"classification must be an integer from 1 to {classes}; got {value!r}")
            count = value
    named = {output.name for output in request.outputs or []}
    return tuple(name for name in known if not named or name in named), count

