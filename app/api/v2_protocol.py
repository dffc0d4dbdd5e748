"""The KServe v2 / Open Inference Protocol apart from its transports: what HTTP (``app/api/routes/v2.py``, JSON
or Triton's binary tensors) and gRPC (``app/grpc/service.py``) both answer, so each transport only turns its
own wire format into these calls and back.

- the model: which one a name and version select (``served``), its metadata and its Triton-style configuration;
- a request's input: the checks of its datatype and shape (``check_input``, before any value is read) and of
  its values (``images_from_values`` for JSON numbers and typed gRPC fields, ``images_from_bytes`` for binary
  data and ``raw_input_contents``);
- a request's outputs: which ones to answer with, and how (``select_outputs``), and the tensors themselves
  (``output_tensors``), with their binary form (``tensor_bytes``).

Binary tensor data is little-endian and row-major; a BOOL element is one byte, a BYTES element a 4-byte
little-endian length and then its bytes (Triton's binary tensor data extension, which gRPC's raw contents
share).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.api.errors import BadRequest, NotFound, PayloadTooLarge
from app.classification.probabilities import AssessedOutput
from app.config import Settings
from app.engine.engine import InferenceEngine
from app.engine.errors import NoModelLoaded
from app.engine.served_model import ServedModel
from model.card import ModelCard

OUTPUT_NAME = "probabilities"
IN_DISTRIBUTION = "in_distribution"
OOD_SCORE = "ood_score"
TRUST_OUTPUTS = (IN_DISTRIBUTION, OOD_SCORE)
PLATFORM = "pytorch"
# The protocol's extensions this service implements (Triton's names), as server metadata reports them.
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration")
# How each datatype's elements are laid out in binary data; BYTES is length-prefixed instead.
NUMPY_TYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4"), "BOOL": np.dtype("?")}


@dataclass(frozen=True)
class InputHeader:
    """An input tensor as a request describes it, before its values."""

    name: str
    datatype: str
    shape: Sequence[int]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class OutputChoice:
    names: tuple[str, ...]  # the names to answer with, in the model's order
    classification: int | None  # the count asked of ``probabilities``, if any
    binary: frozenset[str]  # the names to answer with as binary data (HTTP's extension; gRPC's are all raw)


@dataclass(frozen=True)
class ParsedRequest:
    """A request after its decode stage; ``inputs`` is one array per image, as the classifier takes them."""

    id: str | None
    inputs: list[np.ndarray]
    outputs: OutputChoice


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray  # BYTES: an object array of bytes


def served_model_name(settings: Settings, served: ServedModel) -> str:
    """The model's name in this protocol: APP_MODEL_NAME, else the architecture of the model serving."""
    return settings.model_name or served.card.architecture


def served(engine: InferenceEngine, settings: Settings, model_name: str, model_version: str | None) -> ServedModel:
    """The model serving, when ``model_name`` (and ``model_version``, unless None or empty) name it."""
    model = engine.model
    if model is None:
        raise NoModelLoaded(engine.unavailable_reason)
    if model_name != (name := served_model_name(settings, model)):
        raise NotFound(f"unknown model {model_name!r}: this server serves {name!r}")
    if model_version and model_version != model.card.version:
        raise NotFound(f"model version {model_version!r} is not served; {model.card.version} is")
    return model


def check_version(result: AssessedOutput, model_version: str | None) -> None:
    """A request for one version must be answered by it, even when another was swapped in while it waited."""
    if model_version and result.card.version != model_version:
        raise NotFound(f"version {model_version} was swapped out while this request waited; "
                       f"the model now serving is {result.card.version}")


def input_tensors(card: ModelCard) -> list[tuple[str, str, list[int]]]:
    size = card.input_size
    return [("pixels", "UINT8", [-1, size, size, 3]), ("normalized", "FP32", [-1, 3, size, size])]


def output_metadata(card: ModelCard) -> list[tuple[str, str, list[int]]]:
    trust = [(IN_DISTRIBUTION, "BOOL", [-1]), (OOD_SCORE, "FP32", [-1])] if card.calibration else []
    return [(OUTPUT_NAME, "FP32", [-1, len(card.class_names)]), *trust]


def model_metadata(model: ServedModel, name: str) -> dict[str, Any]:
    tensor = ("name", "datatype", "shape")
    return {"name": name, "versions": [model.card.version], "platform": PLATFORM,
            "inputs": [dict(zip(tensor, spec)) for spec in input_tensors(model.card)],
            "outputs": [dict(zip(tensor, spec)) for spec in output_metadata(model.card)]}


def model_config(model: ServedModel, name: str, engine: InferenceEngine) -> dict[str, Any]:
    """Triton's model configuration (model_config.proto, as its JSON): the batch dimension is implicit, so
    dims leave it out; either input may be sent, so both are optional; a per-image scalar output keeps
    Triton's rule of at least one dim with ``dims: [1]`` and a reshape to ``[]``."""
    formats = {"UINT8": "FORMAT_NHWC", "FP32": "FORMAT_NCHW"}
    inputs = [{"name": input_name, "data_type": f"TYPE_{datatype}", "format": formats[datatype], "dims": shape[1:],
               "optional": True} for input_name, datatype, shape in input_tensors(model.card)]
    outputs = [{"name": output_name, "data_type": f"TYPE_{datatype}", "dims": shape[1:]} if len(shape) > 1 else
               {"name": output_name, "data_type": f"TYPE_{datatype}", "dims": [1], "reshape": {"shape": []}}
               for output_name, datatype, shape in output_metadata(model.card)]
    return {"name": name, "platform": PLATFORM, "backend": PLATFORM, "max_batch_size": engine.max_batch_size,
            "input": inputs, "output": outputs,
            "dynamic_batching": {"max_queue_delay_microseconds": round(engine.max_batch_delay_s * 1e6)}}


def check_input(tensor: InputHeader, size: int, max_images: int) -> None:
    """The checks that need no values: run first, so an oversized tensor is refused before it is decoded."""
    layouts = {"UINT8": [size, size, 3], "FP32": [3, size, size]}
    if tensor.datatype not in layouts:
        raise BadRequest(f"input {tensor.name!r} has datatype {tensor.datatype}; send UINT8 [N, {size}, {size}, 3] "
                         f"pixels or FP32 [N, 3, {size}, {size}] normalised")
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1:] != layouts[tensor.datatype] or shape[0] < 1:
        raise BadRequest(f"input {tensor.name!r} ({tensor.datatype}) must have shape "
                         f"[N, {', '.join(map(str, layouts[tensor.datatype]))}] with N >= 1; got {shape}")
    if shape[0] > max_images:
        raise PayloadTooLarge(f"{shape[0]} images in one request; at most {max_images} (APP_MAX_BATCH_FILES)")


def one_input(count: int, size: int) -> None:
    if count != 1:
        raise BadRequest(f"this model takes one input tensor: UINT8 [N, {size}, {size}, 3] pixels or "
                         f"FP32 [N, 3, {size}, {size}] normalised; got {count}")


def images_from_values(tensor: InputHeader, data: Any) -> list[np.ndarray]:
    """Per-image arrays from numbers (JSON's ``data``, flat or nested, or gRPC's typed contents)."""
    try:
        values = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest(f"input {tensor.name!r}: data must be numbers, flat or nested to the shape") from None
    _check_count(tensor, values.size)
    values = values.reshape(tensor.shape)
    if tensor.datatype == "UINT8":
        if not (np.all(values >= 0) and np.all(values <= 255) and np.all(values == np.floor(values))):
            raise BadRequest(f"input {tensor.name!r}: UINT8 values must be integers from 0 to 255")
        return list(values.astype(np.uint8))
    return _finite(tensor, values.astype(np.float32))


def images_from_bytes(tensor: InputHeader, data: bytes | memoryview) -> list[np.ndarray]:
    """Per-image arrays from binary tensor data: the tensor's elements, little-endian, row-major."""
    dtype = NUMPY_TYPES[tensor.datatype]
    if len(data) != math.prod(tensor.shape) * dtype.itemsize:
        raise BadRequest(f"input {tensor.name!r}: shape {list(tensor.shape)} of {tensor.datatype} needs "
                         f"{math.prod(tensor.shape) * dtype.itemsize} bytes of binary data, got {len(data)}")
    values = np.frombuffer(data, dtype=dtype).reshape(tensor.shape)
    if tensor.datatype == "UINT8":
        return list(values)
    return _finite(tensor, values.astype(np.float32))  # native byte order, and a copy the request may outlive


def _check_count(tensor: InputHeader, count: int) -> None:
    if count != math.prod(tensor.shape):
        raise BadRequest(f"input {tensor.name!r}: shape {list(tensor.shape)} needs {math.prod(tensor.shape)} "
                         f"values, data has {count}")


def _finite(tensor: InputHeader, values: np.ndarray) -> list[np.ndarray]:
    if not np.all(np.isfinite(values)):
        raise BadRequest(f"input {tensor.name!r}: FP32 values must be finite")
    return list(values)


def select_outputs(requested: Sequence[RequestedOutput], card: ModelCard, *, binary_default: bool) -> OutputChoice:
    """The outputs to answer with (all when none is named), the classification count asked of
    ``probabilities``, and which outputs go as binary data: those whose ``binary_data`` says so, else all
    when ``binary_default`` (the request's ``binary_data_output``)."""
    known = (OUTPUT_NAME, *TRUST_OUTPUTS) if card.calibration else (OUTPUT_NAME,)
    classes = len(card.class_names)
    count = None
    binary = set(known) if binary_default else set()
    for output in requested:
        if output.name not in known:
            why = (" (this model's card has no calibration, so it has no OOD outputs)"
                   if output.name in TRUST_OUTPUTS else "")
            raise BadRequest(f"unknown output {output.name!r}{why}: this model's outputs are {', '.join(known)}")
        if "binary_data" in output.parameters:
            wanted = output.parameters["binary_data"]
            if not isinstance(wanted, bool):
                raise BadRequest(f"output {output.name!r}: binary_data must be true or false; got {wanted!r}")
            (binary.add if wanted else binary.discard)(output.name)
        if "classification" in output.parameters:
            if output.name != OUTPUT_NAME:
                raise BadRequest(f"classification applies to the {OUTPUT_NAME!r} output only, not {output.name!r}")
            value = output.parameters["classification"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= classes:
                raise BadRequest(f"classification must be an integer from 1 to {classes}; got {value!r}")
            count = value
    named = {output.name for output in requested}
    names = tuple(name for name in known if not named or name in named)
    return OutputChoice(names, count, frozenset(binary & set(names)))


def output_tensors(choice: OutputChoice, result: AssessedOutput) -> list[OutputTensor]:
    outputs: list[OutputTensor] = []
    if OUTPUT_NAME in choice.names:
        outputs.append(_probabilities(result, choice.classification))
    # A model swapped in while the request waited may lack a calibration the parsed request relied on.
    if IN_DISTRIBUTION in choice.names and result.in_distribution is not None:
        outputs.append(OutputTensor(IN_DISTRIBUTION, "BOOL", [len(result)], result.in_distribution.astype(bool)))
    if OOD_SCORE in choice.names and result.ood_scores is not None:
        outputs.append(OutputTensor(OOD_SCORE, "FP32", [len(result)], result.ood_scores.astype(np.float32)))
    return outputs


def _probabilities(result: AssessedOutput, classification: int | None) -> OutputTensor:
    probabilities = result.probabilities
    if classification:
        names = result.card.class_names
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :classification]
        labels = [f"{float(row[i])}:{i}:{names[i]}".encode() for row, indices in zip(probabilities, order)
                  for i in indices]
        return OutputTensor(OUTPUT_NAME, "BYTES", list(order.shape), np.array(labels, dtype=object))
    return OutputTensor(OUTPUT_NAME, "FP32", list(probabilities.shape), probabilities.astype(np.float32))


def tensor_bytes(tensor: OutputTensor) -> bytes:
    """The tensor as binary data."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(element)) + element for element in tensor.values.ravel())
    return np.ascontiguousarray(tensor.values, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def tensor_json(tensor: OutputTensor) -> list[Any]:
    """The tensor's values as JSON numbers, booleans or strings, flat."""
    if tensor.datatype == "BYTES":
        return [element.decode() for element in tensor.values.ravel()]
    return tensor.values.ravel().tolist()
