"""``POST /explain``: a Grad-CAM heat map with the prediction, as PNG or JSON, its limits, and with the shipped
weights/fastcnn, a peak that follows the object."""

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from app.classification import explanations
from tests.support import REPO_ROOT, images
from tests.support.explain import canvas_png, peak
from tests.support.service import UPLOAD_LIMIT, running_app, service_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio
SHIPPED = REPO_ROOT / "weights" / "fastcnn"


def upload(data: bytes) -> dict:
    return {"files": {"file": ("image.png", data, "image/png")}}


def heatmap(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "L", "an 8-bit grayscale PNG"
    return np.asarray(image)


@pytest.fixture(scope="module")
async def shipped():
    """The service serving the shipped, calibrated weights/fastcnn."""
    async with running_app(service_settings(SHIPPED, max_upload_bytes=UPLOAD_LIMIT)) as (app, client):
        yield app, client


async def test_the_png_is_the_models_input_size_with_the_prediction_in_its_headers(shipped):
    _, client = shipped
    cat = (REPO_ROOT / "examples" / "cat.png").read_bytes()
    response = await client.post("/explain", **upload(cat))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    pixels = heatmap(response.content)
    assert pixels.shape == (32, 32) and pixels.max() == 255
    predicted = (await client.post("/predict", **upload(cat))).json()
    assert response.headers["x-prediction-label"] == predicted["label"] == "cat"
    assert response.headers["x-explained-class"] == "cat"
    assert float(response.headers["x-prediction-confidence"]) == pytest.approx(predicted["confidence"], abs=1e-4)
    assert response.headers["x-prediction-in-distribution"] == "true" and predicted["in_distribution"] is True
    assert float(response.headers["x-prediction-ood-score"]) == pytest.approx(predicted["ood_score"], abs=1e-3)
    assert response.headers["x-model-version"] == predicted["model_version"]


async def test_the_json_variant_carries_the_same_png_and_the_calibrated_prediction(shipped):
    _, client = shipped
    dog = (REPO_ROOT / "examples" / "dog.png").read_bytes()
    as_png = await client.post("/explain?class=car", content=dog, headers={"content-type": "image/png"})
    as_json = await client.post("/explain?class=car&format=json&top_k=5", **upload(dog))
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    body = as_json.json()
    assert base64.b64decode(body["heatmap_png_base64"]) == as_png.content
    assert (body["heatmap_width"], body["heatmap_height"]) == (32, 32)
    assert body["explained_class"] == "car" and body["explained_index"] == 1 and body["layer"] == "layer3.conv1"
    predicted = (await client.post("/predict?top_k=5", **upload(dog))).json()
    assert body["prediction"]["label"] == predicted["label"]
    assert body["prediction"]["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-4)
    assert [entry["label"] for entry in body["prediction"]["top_k"]] == [e["label"] for e in predicted["top_k"]]


async def test_the_peak_moves_with_the_object(shipped):
    """examples/car.png, a real CIFAR-10 test image, top-left and then bottom-right on a plain grey 64x64
    canvas (the service resizes it to 32x32): the map's peak lies in the object's quadrant each time."""
    _, client = shipped
    top_left = heatmap((await client.post("/explain?class=car", **upload(canvas_png("car", (0, 0))))).content)
    bottom_right = heatmap((await client.post("/explain?class=car", **upload(canvas_png("car", (1, 1))))).content)
    (row_a, column_a), (row_b, column_b) = peak(top_left), peak(bottom_right)
    assert row_a < 16 and column_a < 16, peak(top_left)
    assert row_b >= 16 and column_b >= 16, peak(bottom_right)


@pytest.mark.parametrize(("arguments", "status", "detail"), [
    (upload(images.TEXT), 415, "not a supported image"),
    (upload(b""), 400, "empty"),
    ({"content": images.png() + b"\0" * UPLOAD_LIMIT, "headers": {"content-type": "image/png"}}, 413,
     "APP_MAX_UPLOAD_BYTES"),
    (upload(images.bomb_png()), 413, "APP_MAX_IMAGE_PIXELS"),
    ({"files": [("file", ("a.png", images.png())), ("file", ("b.png", images.png()))]}, 400, "one image"),
    ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "Content-Type"),
])
async def test_the_inputs_and_limits_of_predict(shipped, arguments, status, detail):
    _, client = shipped
    response = await client.post("/explain", **arguments)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


@pytest.mark.parametrize(("query", "detail"), [("class=unicorn", "plane, car"), ("format=gif", "format")])
async def test_a_class_or_format_it_does_not_know_is_refused(shipped, query, detail):
    _, client = shipped
    response = await client.post(f"/explain?{query}", **upload(images.png()))
    assert response.status_code in (400, 422) and detail in response.json()["detail"]


async def test_a_request_beyond_the_concurrency_limit_gets_503_at_once(shipped, monkeypatch):
    app, client = shipped
    release = threading.Event()
    original = explanations.grad_cam

    def held(*args, **kwargs):
        release.wait(timeout=60)
        return original(*args, **kwargs)

    monkeypatch.setattr(explanations, "grad_cam", held)
    first = asyncio.ensure_future(client.post("/explain", **upload(images.png())))
    try:
        await eventually(lambda: app.state.explainer.running == 1, 30, "the first explanation to start")
        refused = await client.post("/explain", **upload(images.png(seed=1)))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "APP_EXPLAIN_CONCURRENCY=1" in refused.json()["detail"]
        assert (await client.post("/predict", **upload(images.png()))).status_code == 200, "predict is unaffected"
    finally:
        release.set()
    assert (await first).status_code == 200
    assert app.state.explainer.running == 0


async def test_a_model_without_calibration_says_null(client):
    response = await client.post("/explain?format=json", **upload(images.png()))
    assert response.status_code == 200, response.text
    prediction = response.json()["prediction"]
    assert prediction["in_distribution"] is None and prediction["ood_score"] is None
    png = await client.post("/explain", **upload(images.png()))
    assert png.headers["x-prediction-in-distribution"] == "null" and png.headers["x-prediction-ood-score"] == "null"
    assert heatmap(png.content).shape == (32, 32)
