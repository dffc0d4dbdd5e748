"""The KServe v2 protocol as Triton's own clients speak it, against ``python -m app``: tritonclient.http with its
defaults (binary tensors both ways) and with JSON tensors, and tritonclient.grpc (``app/grpc/service.py``).
Each transport gets the same answers, and the same failures with the status that says so in its protocol.
What tritonclient never sends (typed contents, malformed raw contents) goes through its generated stubs."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from model.card import read_card
from tests.support import REPO_ROOT, images
from tests.support.checkpoints import with_calibration
from tests.support.docs import page, section
from tests.support.net import free_port
from tests.support.service import LiveServer, live_environment, live_server

pytestmark = pytest.mark.server
NAME = "fastcnn"  # APP_MODEL_NAME: the name docs/service.md's example calls (tiny_checkpoint is a resnet18)
OUTPUTS = ("probabilities", "in_distribution", "ood_score")
# bytes: 17 UINT8 images fit even as JSON (~104 KB), so APP_MAX_BATCH_FILES refuses them; 16 FP32 ones (192 KiB)
# do not
UPLOAD_LIMIT = 150_000
TRANSPORTS = ("http-binary", "http-json", "grpc")


@dataclass
class Service:
    server: LiveServer
    grpc_address: str
    checkpoint: Path

    def client(self, transport: str) -> Any:
        if transport == "grpc":
            return grpcclient.InferenceServerClient(self.grpc_address)
        return httpclient.InferenceServerClient(self.server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Service]:
    """A live server with gRPC on a port of its own, serving a calibrated copy of tiny_checkpoint (so the BOOL
    and scalar outputs travel too), with a low upload limit."""
    folder = tmp_path_factory.mktemp("kserve")
    checkpoint = with_calibration(tiny_checkpoint, folder / "calibrated")
    port = free_port()
    environment = live_environment(checkpoint, APP_GRPC_PORT=str(port), APP_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
                                   APP_MAX_BATCH_FILES="16", APP_MODEL_NAME=NAME)
    with live_server(folder, environment) as server:
        yield Service(server, f"127.0.0.1:{port}", checkpoint)


def infer(service: Service, transport: str, tensor: np.ndarray, datatype: str, *, name: str = "pixels",
          model: str = NAME, class_count: int = 0) -> Any:
    """One request as a user of that client writes it: http-binary and grpc with the client's defaults (no
    outputs named, so all of them), http-json with JSON tensors both ways."""
    client = service.client(transport)
    module = grpcclient if transport == "grpc" else httpclient
    tensor_input = module.InferInput(name, list(tensor.shape), datatype)
    if transport == "http-json":
        tensor_input.set_data_from_numpy(tensor, binary_data=False)
        outputs = [httpclient.InferRequestedOutput(output, binary_data=False) for output in OUTPUTS]
    else:
        tensor_input.set_data_from_numpy(tensor)
        outputs = None
    if class_count:
        outputs = [module.InferRequestedOutput("probabilities", class_count=class_count)]
    return client.infer(model, [tensor_input], outputs=outputs)


def cat() -> np.ndarray:
    return np.asarray(Image.open(REPO_ROOT / "examples" / "cat.png").convert("RGB"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_batch_gets_the_probabilities_predict_batch_gives(service, transport):
    pixels = np.stack([cat(), *(images.pixels(32, 32, seed) for seed in range(4))])
    result = infer(service, transport, pixels, "UINT8")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 10)
    assert result.as_numpy("in_distribution").dtype == np.bool_ and result.as_numpy("in_distribution").shape == (5,)
    assert result.as_numpy("ood_score").shape == (5,)
    files = [("files", (f"{n}.png", images.encode(Image.fromarray(image), "PNG"), "image/png"))
             for n, image in enumerate(pixels)]
    expected = httpx.post(f"{service.server.url}/predict/batch", files=files, timeout=60).json()["predictions"]
    for row, in_distribution, answer in zip(probabilities, result.as_numpy("in_distribution"), expected):
        assert np.allclose(row, list(answer["probabilities"].values()), atol=1e-5)
        assert in_distribution == answer["in_distribution"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_normalized_fp32_input_answers_as_the_pixels_do(service, transport):
    card = read_card(service.checkpoint)
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(2)])  # 2 images: as JSON, under the limit
    normalised = ((pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(card.mean)[:, None, None])
                  / np.array(card.std)[:, None, None]).astype(np.float32)
    from_pixels = infer(service, transport, pixels, "UINT8").as_numpy("probabilities")
    from_normalised = infer(service, transport, normalised, "FP32", name="normalized").as_numpy("probabilities")
    assert np.allclose(from_pixels, from_normalised, atol=1e-5)


@pytest.mark.parametrize("transport", ("http-binary", "grpc"))
def test_the_classification_extension_gives_labels(service, transport):
    labels = infer(service, transport, cat()[None], "UINT8", class_count=3).as_numpy("probabilities")
    assert labels.shape == (1, 3)
    parsed = [label.decode().split(":") for label in labels[0]]
    assert [float(value) for value, _, _ in parsed] == sorted((float(value) for value, _, _ in parsed), reverse=True)
    assert all(len(fields) == 3 for fields in parsed)


def test_health_metadata_and_config_agree_between_http_and_grpc(service):
    http, rpc = service.client("http-binary"), service.client("grpc")
    for client in (http, rpc):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    assert "binary_tensor_data" in rpc.get_server_metadata(as_json=True)["extensions"]
    http_config = http.get_model_config(NAME)
    grpc_config = rpc.get_model_config(NAME, as_json=True)["config"]
    assert http_config["max_batch_size"] == grpc_config["max_batch_size"] == 8  # APP_MAX_BATCH_SIZE
    assert [tensor["name"] for tensor in grpc_config["input"]] == ["pixels", "normalized"]
    assert [tensor["name"] for tensor in http_config["output"]] == list(OUTPUTS)
    http_metadata, grpc_metadata = http.get_model_metadata(NAME), rpc.get_model_metadata(NAME, as_json=True)
    assert http_metadata["versions"] == grpc_metadata["versions"] == [read_card(service.checkpoint).version]


def test_the_grpc_health_service_reports_serving(service):
    with grpc.insecure_channel(service.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


ERRORS = [
    # (tensor, datatype, model, HTTP status, gRPC status, what the message says)
    (np.zeros((1, 32, 32), np.uint8), "UINT8", NAME, "400", "INVALID_ARGUMENT", r"must have shape \[N, 32, 32, 3\]"),
    (np.zeros((1, 32, 32, 3), np.int64), "INT64", NAME, "400", "INVALID_ARGUMENT", "has datatype INT64"),
    (np.zeros((16, 3, 32, 32), np.float32), "FP32", NAME, "413", "RESOURCE_EXHAUSTED", "150000"),
    (np.zeros((17, 32, 32, 3), np.uint8), "UINT8", NAME, "413", "RESOURCE_EXHAUSTED", "APP_MAX_BATCH_FILES"),
    (np.zeros((1, 32, 32, 3), np.uint8), "UINT8", "resnet50", "404", "NOT_FOUND", "unknown model 'resnet50'"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("tensor", "datatype", "model", "http_status", "grpc_status", "message"), ERRORS)
def test_bad_requests_get_the_same_failure_through_each_client(service, transport, tensor, datatype, model,
                                                               http_status, grpc_status, message):
    with pytest.raises(InferenceServerException) as failure:
        infer(service, transport, tensor, datatype, model=model)
    expected = f"StatusCode.{grpc_status}" if transport == "grpc" else http_status
    assert failure.value.status() == expected, failure.value
    assert re.search(message, failure.value.message()), failure.value.message()


def test_grpc_calls_are_counted_by_method_and_status(service):
    with pytest.raises(InferenceServerException):
        infer(service, "grpc", np.zeros((1, 32, 32), np.uint8), "UINT8")
    infer(service, "grpc", cat()[None], "UINT8")
    samples = [sample for family in text_string_to_metric_families(httpx.get(f"{service.server.url}/metrics").text)
               for sample in family.samples]

    def value(name: str, **labels: str) -> float:
        wanted = {"grpc_service": "inference.GRPCInferenceService", **labels}
        return sum(sample.value for sample in samples if sample.name == name and sample.labels == wanted)

    assert value("grpc_server_handled_total", grpc_method="ModelInfer", grpc_code="OK") >= 1
    assert value("grpc_server_handled_total", grpc_method="ModelInfer", grpc_code="INVALID_ARGUMENT") >= 1
    assert value("grpc_server_handling_seconds_count", grpc_method="ModelInfer") >= 2


@pytest.mark.parametrize("transport", ("http", "grpc"))
def test_the_docs_tritonclient_example_runs_as_written(service, transport):
    [example] = re.findall(r"```python\n(.*?)```", section(page("docs/service.md"),
                                                            "## KServe v2 / Open Inference Protocol"), re.DOTALL)
    address = service.server.url.removeprefix("http://")
    if transport == "grpc":  # the swap the example's comment describes
        example, address = example.replace("tritonclient.http", "tritonclient.grpc"), service.grpc_address
    script = example.replace('"localhost:8000"', repr(address))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    probabilities = np.array([float(value) for value in re.findall(r"[-+\d.e]+", result.stdout)])
    assert probabilities.shape == (10,) and probabilities.sum() == pytest.approx(1, abs=1e-3)


def grpc_stub(service: Service) -> tuple[grpc.Channel, triton_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(service.grpc_address)
    return channel, triton_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_answer_as_raw_bytes_do(service):
    """Clients that fill the typed fields (uint_contents, fp32_contents) rather than raw_input_contents."""
    pixels = np.stack([cat(), images.pixels(32, 32, 1)])
    expected = infer(service, "grpc", pixels, "UINT8").as_numpy("probabilities")
    card = read_card(service.checkpoint)
    normalised = ((pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(card.mean)[:, None, None])
                  / np.array(card.std)[:, None, None]).astype(np.float32)
    channel, stub = grpc_stub(service)
    with channel:
        for name, datatype, tensor, field in (("pixels", "UINT8", pixels, "uint_contents"),
                                              ("normalized", "FP32", normalised, "fp32_contents")):
            request = triton.ModelInferRequest(model_name=NAME)
            sent = request.inputs.add(name=name, datatype=datatype, shape=list(tensor.shape))
            getattr(sent.contents, field).extend(tensor.ravel().tolist())
            request.outputs.add(name="probabilities")
            answer = stub.ModelInfer(request, timeout=60)
            assert [output.name for output in answer.outputs] == ["probabilities"]
            assert np.allclose(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 10), expected,
                               atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ("two raw entries", "2 entries for 1 inputs"),
    ("short raw", "needs 3072 bytes of binary data, got 3000"),
    ("raw and contents", "contents as well as raw_input_contents"),
    ("unknown output", "unknown output 'logits'"),
    ("two inputs", "takes one input tensor"),
])
def test_malformed_grpc_requests_are_invalid_argument(service, change, message):
    pixels = cat()[None]
    request = triton.ModelInferRequest(model_name=NAME)
    sent = request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes()[:3000] if change == "short raw" else pixels.tobytes())
    if change == "two raw entries":
        request.raw_input_contents.append(pixels.tobytes())
    if change == "raw and contents":
        sent.contents.uint_contents.extend([0] * 3072)
    if change == "unknown output":
        request.outputs.add(name="logits")
    if change == "two inputs":
        request.inputs.add(name="normalized", datatype="FP32", shape=[1, 3, 32, 32])
    channel, stub = grpc_stub(service)
    with channel, pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(request, timeout=60)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
