"""The KServe v2 / Open Inference Protocol over HTTP, so Triton and KServe clients work unchanged.

Spec: https://github.com/kserve/open-inference-protocol (specification/protocol/inference_rest.md), with
Triton's binary tensor data, classification and model configuration extensions. What the protocol answers
apart from HTTP (the model, the input checks, the outputs) is ``app/api/v2_protocol.py``, shared with the gRPC
server (``app/grpc``). The model is served under the name ``APP_MODEL_NAME``, by default its architecture
(``fastcnn`` for the shipped checkpoint); its version is the card's ``.version``, and ``/versions/<v>`` paths
answer 404 for any version but the one serving.

One input tensor per request, either ``UINT8 [N, 32, 32, 3]`` raw RGB pixels (normalised by the server with
the card's mean and std) or ``FP32 [N, 3, 32, 32]`` already normalised; ``data`` flat (row-major) or nested,
or binary: the request's JSON is then followed by the tensor's bytes, ``Inference-Header-Content-Length``
says where the JSON ends and the input's ``binary_data_size`` parameter how many bytes it has (tritonclient's
default). The output ``probabilities`` is ``FP32 [N, 10]`` (calibrated as ``/predict``'s are); requesting it
with the parameter ``{"classification": k}`` (Triton's classification extension) returns ``BYTES [N, k]``
strings ``"<probability>:<index>:<label>"`` instead. A model whose card has a calibration has two more
outputs: ``in_distribution``, ``BOOL [N]``, and ``ood_score``, ``FP32 [N]``, as in ``/predict``'s answer (the
score's kind and threshold are in ``GET /model``); a model without one has neither, so a BOOL tensor never
needs a null. A request without ``outputs`` gets every output, one with ``outputs`` gets those it names. An
output goes as binary data after the response's JSON when its ``binary_data`` parameter is true, or when the
request's ``binary_data_output`` is and its own is not false. Errors are ``{"error": "..."}``.

A JSON body costs far more memory parsed than sent (an 8 MiB one peaked at +192 MiB), so the body is
refused before parsing when it holds more values than the largest request (``APP_MAX_BATCH_FILES`` images)
can: a JSON array separates its values with commas, and counting those is cheap. Binary data is not parsed:
its bytes become the tensor as they are.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from app import __version__
from app.api.deps import SettingsDep
from app.api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.api.serving_deps import ClassifierDep, EngineDep
from app.api.uploads import read_body
from app.api.v2_protocol import (
    EXTENSIONS,
    OUTPUT_NAME,
    InputHeader,
    ParsedRequest,
    RequestedOutput,
    check_input,
    check_version,
    images_from_bytes,
    images_from_values,
    model_config,
    model_metadata,
    one_input,
    output_tensors,
    select_outputs,
    served,
    tensor_bytes,
    tensor_json,
)
from app.classification.probabilities import AssessedOutput
from app.engine.errors import NoModelLoaded
from model.card import ModelCard

# Commas a request may hold besides those between its tensor's values: ids, parameters and outputs.
OTHER_COMMAS = 1024
HEADER_LENGTH = "Inference-Header-Content-Length"
router = APIRouter(prefix="/v2", tags=["kserve-v2"])


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
    parameters: Parameters | None = Field(None, json_schema_extra={"properties": {
        "binary_data_size": {"type": "integer", "minimum": 0}}})
    data: list[int | float | list[Any]] | None = Field(
        None, description="the product of shape's values, flat in row-major order (nested to the shape is "
        "accepted too); UINT8 integers 0-255, or finite FP32 numbers. Absent when the tensor is binary data "
        "after the JSON (the binary_data_size parameter)", json_schema_extra={"minItems": 1,
                                                                               "items": {"type": "number"}})


class RequestOutput(BaseModel):
    model_config = _STRICT
    name: str = Field(json_schema_extra={"enum": [OUTPUT_NAME]})
    parameters: Parameters | None = Field(None, json_schema_extra={"properties": {
        "classification": {"type": "integer", "minimum": 1, "maximum": 10}, "binary_data": {"type": "boolean"}}})


class InferenceRequest(BaseModel):
    model_config = _STRICT
    id: str | None = None
    parameters: Parameters | None = Field(None, json_schema_extra={"properties": {
        "binary_data_output": {"type": "boolean"}}})
    inputs: list[RequestInput] = Field(min_length=1, json_schema_extra={"maxItems": 1})
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, int] | None = Field(None, description="binary_data_size, for an output sent as binary "
                                              "data after the JSON")
    data: list[Any] | None = None


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


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorObject} for code in (400, 404, 413, 415, 503, 504)}


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
_BINARY_ANSWER = {"description": "the JSON response; when outputs are asked for as binary data, "
                  "application/octet-stream: the JSON, then those outputs' bytes (binary_data_size each, in order), "
                  "the Inference-Header-Content-Length header giving the JSON's length",
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {**ERRORS, 200: {"model": InferenceResponse, **_BINARY_ANSWER}}


@router.get("")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="cifar-serve", version=__version__, extensions=list(EXTENSIONS))


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
async def get_model_metadata(engine: EngineDep, settings: SettingsDep, model_name: str,
                             model_version: str | None = None) -> ModelMetadata:
    return ModelMetadata.model_validate(model_metadata(served(engine, settings, model_name, model_version),
                                                       model_name))


@router.get("/models/{model_name}/config", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}/config", responses=ERRORS)
async def get_model_config(engine: EngineDep, settings: SettingsDep, model_name: str,
                           model_version: str | None = None) -> dict[str, Any]:
    """The model's configuration as Triton writes it (model_config.proto's fields): what Triton's tools
    (perf_analyzer, model analyzers, clients that read max_batch_size) read."""
    return model_config(served(engine, settings, model_name, model_version), model_name, engine)


@router.get("/models/{model_name}/ready", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}/ready", responses=ERRORS)
async def model_ready(engine: EngineDep, settings: SettingsDep, model_name: str,
                      model_version: str | None = None) -> dict[str, Any]:
    served(engine, settings, model_name, model_version)
    return {"name": model_name, "ready": engine.ready}


@router.post("/models/{model_name}/infer", responses=_INFER_RESPONSES, response_model=InferenceResponse,
             openapi_extra=_INFER_BODY)
@router.post("/models/{model_name}/versions/{model_version}/infer", responses=_INFER_RESPONSES,
             response_model=InferenceResponse, openapi_extra=_INFER_BODY)
async def infer(request: Request, engine: EngineDep, classifier: ClassifierDep, settings: SettingsDep,
                model_name: str, model_version: str | None = None) -> Response:
    """The classification pipeline (``app/classification/classifier.py``), with this protocol's own decode
    stage (JSON or binary tensors, ``_parse``) and response (``_respond``)."""
    deadline = time.monotonic() + settings.request_timeout_s
    model = served(engine, settings, model_name, model_version)
    header_length = _header_length(request, settings.max_upload_bytes)
    body = await read_body(request, settings.max_upload_bytes)
    decode = functools.partial(_parse, body, header_length=header_length, max_images=settings.max_batch_files,
                               card=model.card)
    parsed, result = await classifier.classify_tensors(decode, deadline=deadline)
    check_version(result, model_version)
    return _respond(parsed, result, model_name)


def _header_length(request: Request, limit: int) -> int | None:
    """The length of the JSON before the binary tensor data, from the headers, checked before the body is read;
    None for a JSON-only request. A compressed body is refused: its decompressed size is not bounded by
    APP_MAX_UPLOAD_BYTES."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not accepted: send the request uncompressed "
                                   "(tritonclient's default, request_compression_algorithm=None)")
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest(f"{HEADER_LENGTH} must be the byte length of the JSON before the binary data; got "
                         f"{value[:32]!r}")
    length = int(value)
    if length > limit:
        raise PayloadTooLarge(f"{HEADER_LENGTH} says the JSON alone is {length} bytes, over the limit of {limit} "
                              "for the whole body (APP_MAX_UPLOAD_BYTES)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and length > int(declared):
        raise BadRequest(f"{HEADER_LENGTH} ({length}) is longer than the body ({declared} bytes)")
    return length


def _respond(parsed: ParsedRequest, result: AssessedOutput, model_name: str) -> Response:
    """The JSON response; outputs asked for as binary data follow it, in order, each one's size in its
    ``binary_data_size`` parameter."""
    outputs: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for tensor in output_tensors(parsed.outputs, result):
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.name in parsed.outputs.binary:
            binary.append(tensor_bytes(tensor))
            output["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            output["data"] = tensor_json(tensor)
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": result.card.version}
    if parsed.id is not None:
        answer["id"] = parsed.id
    header = json.dumps(answer | {"outputs": outputs}, separators=(",", ":")).encode()
    if not binary:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *binary]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _parse(body: bytes, size: int, *, header_length: int | None, max_images: int, card: ModelCard) -> ParsedRequest:
    """Validate an inference request and turn its tensor into per-image arrays of side ``size`` (the decode
    stage of this protocol; the classifier runs it on its decode threads)."""
    if header_length is not None and header_length > len(body):
        raise BadRequest(f"{HEADER_LENGTH} ({header_length}) is longer than the body ({len(body)} bytes)")
    document = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(document):]
    request = _validate(document, size, max_images)
    one_input(len(request.inputs), size)
    tensor = request.inputs[0]
    header = InputHeader(tensor.name, tensor.datatype, tensor.shape)
    check_input(header, size, max_images)
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is None:
        if tensor.data is None:
            raise BadRequest(f"input {tensor.name!r} has no data: send its values as 'data', or as binary data "
                             f"after the JSON with its binary_data_size parameter and {HEADER_LENGTH}")
        if binary:
            raise BadRequest(f"{len(binary)} bytes follow the JSON, but no input has a binary_data_size parameter")
        images = images_from_values(header, tensor.data)
    else:
        if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size < 0:
            raise BadRequest(f"input {tensor.name!r}: binary_data_size must be a byte count; got {binary_size!r}")
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both data and binary_data_size: send one of them")
        if header_length is None:
            raise BadRequest(f"input {tensor.name!r} has binary_data_size but the request has no {HEADER_LENGTH} "
                             "header saying where its JSON ends")
        if binary_size != len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size is {binary_size}, but {len(binary)} bytes "
                             "follow the JSON")
        images = images_from_bytes(header, binary)
    binary_output = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest(f"binary_data_output must be true or false; got {binary_output!r}")
    requested = [RequestedOutput(output.name, dict(output.parameters or {})) for output in request.outputs or []]
    return ParsedRequest(request.id, images, select_outputs(requested, card, binary_default=binary_output))


def _validate(document: bytes, size: int, max_images: int) -> InferenceRequest:
    most_values = max_images * 3 * size * size
    if document.count(b",") > most_values + OTHER_COMMAS:
        raise PayloadTooLarge(f"the request holds more values than {max_images} images (APP_MAX_BATCH_FILES) of "
                              f"{3 * size * size} values each; send at most {max_images} per request")
    try:
        return InferenceRequest.model_validate_json(document)
    except ValidationError as error:
        found = error.errors()
        if any("data" in problem["loc"] for problem in found):
            raise BadRequest("the input's data must be numbers (not strings or booleans), flat or nested to the "
                             "shape") from None
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}" for p in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise BadRequest(f"not a v2 inference request: {problems}{more}") from None
