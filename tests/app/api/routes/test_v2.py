"""The KServe v2 / Open Inference Protocol routes, checked against the spec's shapes and against /predict: JSON
and Triton's binary tensor data framing, built here byte by byte (tests/app/grpc/test_clients.py drives them
with tritonclient)."""

import json
import struct

import numpy as np
import pytest

from model.card import read_card
from model.labels import CLASS_NAMES
from tests.support import images
from tests.support.checkpoints import with_calibration
from tests.support.service import running_app, service_settings

pytestmark = pytest.mark.anyio
NAME = "resnet18"  # the served architecture: tiny_checkpoint's
INFER = f"/v2/models/{NAME}/infer"


def uint8_request(pixels: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                        "data": pixels.ravel().tolist()}]} | extra


async def test_health_and_metadata(client, tiny_checkpoint):
    card = read_card(tiny_checkpoint)
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get(f"/v2/models/{NAME}/ready")).json() == {"name": NAME, "ready": True}
    server = (await client.get("/v2")).json()
    assert server["name"] == "cifar-serve" and "classification" in server["extensions"]
    metadata = (await client.get(f"/v2/models/{NAME}")).json()
    assert metadata["name"] == NAME and metadata["versions"] == [card.version]
    assert {"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]} in metadata["inputs"]
    assert {"name": "normalized", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in metadata["inputs"]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    versioned = await client.get(f"/v2/models/{NAME}/versions/{card.version}")
    assert versioned.status_code == 200


async def test_uint8_pixels_get_the_same_probabilities_as_the_png_on_predict(client):
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(3)])
    response = await client.post(INFER, json=uint8_request(pixels, id="req-42"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-42" and body["model_name"] == NAME
    assert body["model_version"] == (await client.get("/model")).json()["version"]
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [3, 10]
    probabilities = np.array(output["data"]).reshape(3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    for row, image in zip(probabilities, pixels):
        png = images.encode(__import__("PIL.Image").Image.fromarray(image), "PNG")
        single = (await client.post("/predict", content=png, headers={"content-type": "image/png"})).json()
        assert np.allclose(row, list(single["probabilities"].values()), atol=1e-5)


async def test_fp32_normalised_input_and_nested_data_give_the_same_answer(client, tiny_checkpoint):
    card = read_card(tiny_checkpoint)
    pixels = images.pixels(32, 32, seed=7)[None]
    normalised = ((pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(card.mean)[:, None, None])
                  / np.array(card.std)[:, None, None])
    flat = (await client.post(INFER, json=uint8_request(pixels))).json()["outputs"][0]["data"]
    nested = {"inputs": [{"name": "normalized", "shape": [1, 3, 32, 32], "datatype": "FP32",
                          "data": normalised.tolist()}]}
    response = await client.post(INFER, json=nested)
    assert response.status_code == 200, response.text
    assert np.allclose(response.json()["outputs"][0]["data"], flat, atol=1e-5)


async def test_the_classification_parameter_returns_labels(client):
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(2)])
    plain = np.array((await client.post(INFER, json=uint8_request(pixels))).json()["outputs"][0]["data"]).reshape(2, 10)
    request = uint8_request(pixels, outputs=[{"name": "probabilities", "parameters": {"classification": 3}}])
    output = (await client.post(INFER, json=request)).json()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    for row, entries in zip(plain, np.array(output["data"]).reshape(2, 3)):
        order = np.argsort(-row, kind="stable")[:3]
        for index, entry in zip(order, entries):
            value, position, label = entry.split(":")
            assert int(position) == index and label == CLASS_NAMES[index]
            assert float(value) == pytest.approx(row[index], abs=1e-6)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"inputs": []}, 400, "inputs"),
    ({"id": 3, "inputs": "x"}, 400, "not a v2 inference request"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "INT64", "data": [0] * 3072}]}, 400, "datatype"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32], "datatype": "UINT8", "data": [0] * 1024}]}, 400, "shape"),
    ({"inputs": [{"name": "x", "shape": [0, 32, 32, 3], "datatype": "UINT8", "data": []}]}, 400, "N >= 1"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 10}]}, 400, "needs 3072"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [256] * 3072}]}, 400, "0 to 255"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0.5] * 3072}]}, 400, "integers"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": ["a"] * 3072}]}, 400, "numbers"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [[1, 2], [3]]}]}, 400, "numbers"),
    # What the schema calls invalid is refused, not coerced: a number in a string, a boolean for a number.
    ({"inputs": [{"name": "x", "shape": ["1", 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}]}, 400, "shape"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [True] + [0] * 3071}]}, 400,
     "numbers"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072,
                  "parameters": {"nested": {"a": 1}}}]}, 400, "parameters"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [float("nan")] * 3072}]}, 400,
     "not a v2 inference request|finite"),
    ({"inputs": [{"name": "x", "shape": [17, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072 * 17}]}, 413,
     "APP_MAX_BATCH_FILES"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}],
      "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}],
      "outputs": [{"name": "in_distribution"}]}, 400, "no calibration"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}],
      "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}, 400, "1 to 10"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}],
      "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]}, 400, "true or false"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8"}]}, 400, "has no data"),
    ({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                  "parameters": {"binary_data_size": 3072}}]}, 400, "Inference-Header-Content-Length"),
])
async def test_bad_requests_get_a_v2_error_object(client, body, status, message):
    import re

    response = await client.post(INFER, content=json.dumps(body, allow_nan=True),
                                 headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert re.search(message, response.json()["error"])


@pytest.mark.parametrize(("path", "named"), [("/v2/models/resnet50", NAME),
                                             (f"/v2/models/{NAME}/versions/resnet18-000000000000", "resnet18-"),
                                             ("/v2/models/other/ready", NAME)])
async def test_unknown_models_and_versions_are_404(client, path, named):
    response = await client.get(path)
    assert response.status_code == 404
    assert named in response.json()["error"]


async def test_a_configured_model_name_is_the_only_one_served(tiny_checkpoint):
    async with running_app(service_settings(tiny_checkpoint, model_name="cifar10")) as (_, client):
        assert (await client.get("/v2/models/cifar10/ready")).json() == {"name": "cifar10", "ready": True}
        assert (await client.get(f"/v2/models/{NAME}")).status_code == 404
        pixels = images.pixels(32, 32)[None]
        response = await client.post("/v2/models/cifar10/infer", json=uint8_request(pixels))
        assert response.status_code == 200 and response.json()["model_name"] == "cifar10"


async def test_a_body_with_more_values_than_the_largest_request_is_refused_before_parsing(service):
    most = service.app.state.settings.max_batch_files * 3072
    body = b'{"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [' + b"0," * (
        2 * most) + b'0]}]}'
    response = await service.client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "APP_MAX_BATCH_FILES" in response.json()["error"]


def binary_request(tensor: np.ndarray, datatype: str, *, size: int | None = None, **extra) -> tuple[bytes, dict]:
    """A request in Triton's binary tensor data framing: the JSON, then the tensor's bytes."""
    raw = tensor.tobytes()
    document = json.dumps({"inputs": [{"name": "pixels", "shape": list(tensor.shape), "datatype": datatype,
                                       "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
                          | extra).encode()
    return document + raw, {"inference-header-content-length": str(len(document)),
                            "content-type": "application/octet-stream"}


def split_binary(response) -> tuple[dict, bytes]:
    length = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:length]), response.content[length:]


async def test_binary_inputs_and_outputs_carry_the_same_numbers_as_json(client):
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(3)])
    expected = (await client.post(INFER, json=uint8_request(pixels))).json()["outputs"][0]
    body, headers = binary_request(pixels, "UINT8", parameters={"binary_data_output": True}, id="b-1")
    response = await client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    answer, raw = split_binary(response)
    assert answer["id"] == "b-1"
    [output] = answer["outputs"]
    assert output["parameters"] == {"binary_data_size": 3 * 10 * 4} and "data" not in output
    assert len(raw) == 120
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(3, 10), np.reshape(expected["data"], (3, 10)),
                               rtol=1e-6)


async def test_a_binary_input_may_ask_for_json_outputs_and_one_output_may_override_binary_data_output(client):
    pixels = images.pixels(32, 32)[None]
    body, headers = binary_request(pixels, "UINT8")
    response = await client.post(INFER, content=body, headers=headers)
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["outputs"][0]["data"]) == 10
    body, headers = binary_request(pixels, "UINT8", parameters={"binary_data_output": True},
                                   outputs=[{"name": "probabilities", "parameters": {"binary_data": False}}])
    assert len((await client.post(INFER, content=body, headers=headers)).json()["outputs"][0]["data"]) == 10


async def test_binary_classification_strings_are_length_prefixed(client):
    pixels = images.pixels(32, 32)[None]
    body, headers = binary_request(pixels, "UINT8", outputs=[
        {"name": "probabilities", "parameters": {"classification": 2, "binary_data": True}}])
    answer, raw = split_binary(await client.post(INFER, content=body, headers=headers))
    assert answer["outputs"][0]["datatype"] == "BYTES" and answer["outputs"][0]["shape"] == [1, 2]
    labels = []
    while raw:
        length = struct.unpack("<I", raw[:4])[0]
        labels.append(raw[4:4 + length].decode())
        raw = raw[4 + length:]
    assert len(labels) == 2 and all(label.split(":")[2] in CLASS_NAMES for label in labels)


async def test_fp32_binary_input_is_read_little_endian(client):
    normalised = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("<f4")
    expected = (await client.post(INFER, json={"inputs": [{"name": "normalized", "shape": [2, 3, 32, 32],
                                                           "datatype": "FP32",
                                                           "data": normalised.ravel().tolist()}]})).json()
    body, headers = binary_request(normalised, "FP32")
    assert (await client.post(INFER, content=body, headers=headers)).json()["outputs"] == expected["outputs"]


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"size": 100}, 400, "binary_data_size is 100"),
    ({"header": "abc"}, 400, "byte length of the JSON"),
    ({"header": "99999999"}, 413, "APP_MAX_UPLOAD_BYTES"),
    ({"header": "5000"}, 400, "longer than the body"),
    ({"encoding": "gzip"}, 415, "uncompressed"),
    ({"shape": [70, 32, 32, 3]}, 413, "APP_MAX_BATCH_FILES"),
])
async def test_bad_binary_requests_get_a_v2_error_object(client, change, status, message):
    pixels = images.pixels(32, 32)[None]
    body, headers = binary_request(pixels, "UINT8", size=change.get("size"))
    if "shape" in change:
        body = body.replace(b"[1, 32, 32, 3]", json.dumps(change["shape"]).encode())
        headers["inference-header-content-length"] = str(body.index(b"}]}") + 3)
    if "header" in change:
        headers["inference-header-content-length"] = change["header"]
    if "encoding" in change:
        headers["content-encoding"] = change["encoding"]
    response = await client.post(INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


async def test_model_config_is_tritons_with_the_engines_batching(service, tiny_checkpoint):
    card = read_card(tiny_checkpoint)
    for path in (f"/v2/models/{NAME}/config", f"/v2/models/{NAME}/versions/{card.version}/config"):
        config = (await service.client.get(path)).json()
        assert config["name"] == NAME and config["platform"] == "pytorch"
        assert config["max_batch_size"] == service.app.state.engine.max_batch_size == 8
        assert {"name": "pixels", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3],
                "optional": True} in config["input"]
        assert {"name": "normalized", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, 32, 32],
                "optional": True} in config["input"]
        assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
        assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 5000}
    assert (await service.client.get("/v2/models/other/config")).status_code == 404


async def test_malformed_json_is_a_400(client):
    response = await client.post(INFER, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


@pytest.fixture(scope="module")
async def calibrated(tiny_checkpoint, tmp_path_factory):
    """A service of a calibrated copy of the tiny checkpoint (its answers are checked against /predict's)."""
    checkpoint = with_calibration(tiny_checkpoint, tmp_path_factory.mktemp("v2-calibrated") / "ckpt",
                                  temperature=2.0, threshold=0.0)
    async with running_app(service_settings(checkpoint)) as (_, client):
        yield client


async def test_a_calibrated_model_adds_the_ood_outputs_equal_to_predicts(calibrated):
    metadata = (await calibrated.get(f"/v2/models/{NAME}")).json()
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                                   {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]},
                                   {"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(3)])
    body = (await calibrated.post(INFER, json=uint8_request(pixels))).json()
    outputs = {output["name"]: output for output in body["outputs"]}
    assert list(outputs) == ["probabilities", "in_distribution", "ood_score"]
    assert outputs["in_distribution"]["datatype"] == "BOOL" and outputs["in_distribution"]["shape"] == [3]
    assert outputs["ood_score"]["datatype"] == "FP32" and outputs["ood_score"]["shape"] == [3]
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 10)
    for index, image in enumerate(pixels):
        png = images.encode(__import__("PIL.Image").Image.fromarray(image), "PNG")
        single = (await calibrated.post("/predict", content=png, headers={"content-type": "image/png"})).json()
        assert np.allclose(probabilities[index], list(single["probabilities"].values()), atol=1e-5)
        assert outputs["in_distribution"]["data"][index] is single["in_distribution"]
        assert outputs["ood_score"]["data"][index] == pytest.approx(single["ood_score"], abs=1e-4)


async def test_naming_outputs_returns_only_those(calibrated):
    pixels = images.pixels(32, 32, seed=4)[None]
    body = (await calibrated.post(INFER, json=uint8_request(pixels, outputs=[{"name": "ood_score"}]))).json()
    assert [output["name"] for output in body["outputs"]] == ["ood_score"]
    request = uint8_request(pixels, outputs=[{"name": "in_distribution", "parameters": {"classification": 2}}])
    response = await calibrated.post(INFER, json=request)
    assert response.status_code == 400 and "probabilities" in response.json()["error"]


async def test_an_uncalibrated_model_has_only_the_probabilities(client):
    pixels = images.pixels(32, 32, seed=4)[None]
    body = (await client.post(INFER, json=uint8_request(pixels))).json()
    assert [output["name"] for output in body["outputs"]] == ["probabilities"]
