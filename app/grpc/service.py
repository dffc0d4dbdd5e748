"""``inference.GRPCInferenceService``: the KServe v2 protocol's gRPC methods, answered as HTTP answers them
(``app/api/v2_protocol.py``) by the same classification pipeline.

Tensors come as ``raw_input_contents`` (tritonclient's way: little-endian bytes, one entry per input) or as
the typed ``contents`` fields (``uint_contents`` for UINT8, ``fp32_contents`` for FP32); every output goes back
in ``raw_output_contents``, as Triton answers. Failures are the HTTP route's, with the gRPC status that says
the same (``STATUS_CODES``): a 400 is INVALID_ARGUMENT, a 413 RESOURCE_EXHAUSTED, a 503 UNAVAILABLE (with
a ``retry-after`` trailer in seconds, as HTTP's header), a 504 DEADLINE_EXCEEDED. Anything unexpected is
logged with its traceback and answered as INTERNAL. A request's deadline is the sooner of the client's and
``APP_REQUEST_TIMEOUT_S``. Every call is counted by method and status code (``GrpcMetrics``) and logged as
HTTP's requests are, under the client's ``x-request-id`` (metadata) when it sends a sane one.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from app import __version__
from app.api.errors import STATUS, BadRequest
from app.api.v2_protocol import (
    EXTENSIONS,
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
)
from app.classification.classifier import Classifier
from app.config import Settings
from app.engine.engine import InferenceEngine
from app.engine.errors import NoModelLoaded, QueueFull, ServiceStopping
from app.grpc import inference_pb2 as pb
from app.grpc.inference_pb2_grpc import GRPCInferenceServiceServicer
from app.grpc.metrics import GrpcMetrics
from app.logging import request_id
from model.card import ModelCard

logger = logging.getLogger("app.access")
error_logger = logging.getLogger("app.errors")
# The HTTP status of each expected failure (app/api/errors.py) as the gRPC status that means the same.
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                415: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The typed contents field of each input datatype.
_CONTENTS = {"UINT8": "uint_contents", "FP32": "fp32_contents"}

Reply = TypeVar("Reply")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Reply]]


def status_code(error: Exception) -> grpc.StatusCode | None:
    """The gRPC status of an expected failure; None for anything else."""
    http = next((code for kind, code in STATUS.items() if isinstance(error, kind)), None)
    return None if http is None else STATUS_CODES.get(http, grpc.StatusCode.UNKNOWN)


def _rpc(method: Handler[Reply]) -> Handler[Reply]:
    """One call's request ID, status, metrics and access log; expected failures become their gRPC status."""
    name = method.__name__

    @functools.wraps(method)
    async def answer(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Reply:
        started = time.perf_counter()
        incoming = dict(context.invocation_metadata() or ()).get("x-request-id")
        request_id.set(incoming if isinstance(incoming, str) and _SANE_ID.match(incoming) else uuid.uuid4().hex)
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as error:
            expected = status_code(error)
            if expected is None:
                error_logger.exception("unhandled error", extra={"path": name})
                code, message = grpc.StatusCode.INTERNAL, f"internal error; logged under request ID {request_id.get()}"
            else:
                code, message = expected, str(error)
            if isinstance(error, QueueFull):
                context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
            elif isinstance(error, (NoModelLoaded, ServiceStopping)):
                context.set_trailing_metadata((("retry-after", "5"),))
            await context.abort(code, message)
            raise  # abort raised; this line is for the type checker
        except BaseException:  # the client cancelled, or its deadline passed: no one is left to answer
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(name, code.name, seconds)
            logger.info("request", extra={"method": "gRPC", "path": name, "route": name, "status": code.name,
                                          "ms": round(seconds * 1000, 2)})

    return answer


class InferenceService(GRPCInferenceServiceServicer):
    def __init__(self, settings: Settings, engine: InferenceEngine, classifier: Classifier,
                 metrics: GrpcMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.classifier = classifier
        self.metrics = metrics

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.engine.ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        served(self.engine, self.settings, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.engine.ready)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="cifar-serve", version=__version__, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        model = served(self.engine, self.settings, request.name, request.version)
        return json_format.ParseDict(model_metadata(model, request.name), pb.ModelMetadataResponse())

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ModelConfigResponse:
        model = served(self.engine, self.settings, request.name, request.version)
        config = json_format.ParseDict(model_config(model, request.name, self.engine), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        timeout = self.settings.request_timeout_s
        if (remaining := context.time_remaining()) is not None:
            timeout = min(timeout, remaining)
        deadline = time.monotonic() + timeout
        model = served(self.engine, self.settings, request.model_name, request.model_version)
        decode = functools.partial(_parse, request, max_images=self.settings.max_batch_files, card=model.card)
        parsed, result = await self.classifier.classify_tensors(decode, deadline=deadline)
        check_version(result, request.model_version)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=result.card.version,
                                         id=request.id)
        for tensor in output_tensors(parsed.outputs, result):
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(tensor_bytes(tensor))
        return response


def _parse(request: pb.ModelInferRequest, size: int, *, max_images: int, card: ModelCard) -> ParsedRequest:
    """The decode stage of a gRPC request (run on the classifier's decode threads)."""
    one_input(len(request.inputs), size)
    tensor = request.inputs[0]
    header = InputHeader(tensor.name, tensor.datatype, list(tensor.shape))
    check_input(header, size, max_images)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise BadRequest(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                             f"{len(request.inputs)} inputs: send one per input")
        if tensor.HasField("contents"):
            raise BadRequest(f"input {tensor.name!r} has contents as well as raw_input_contents: send one of them")
        images = images_from_bytes(header, request.raw_input_contents[0])
    else:
        images = images_from_values(header, getattr(tensor.contents, _CONTENTS[tensor.datatype]))
    requested = [RequestedOutput(output.name, {key: _value(value) for key, value in output.parameters.items()})
                 for output in request.outputs]
    return ParsedRequest(request.id or None, images, select_outputs(requested, card, binary_default=True))


def _value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)
