import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from app.classification.images import image_pixels
from model.checkpoint import load_checkpoint
from model.labels import CLASS_NAMES
from tests.support import images
from tests.support.asgi import call_with_endless_body
from tests.support.checkpoints import with_calibration
from tests.support.service import UPLOAD_LIMIT, running_app, service_settings

pytestmark = pytest.mark.anyio


def multipart(data: bytes, name: str = "image.png", content_type: str = "image/png", field: str = "file"):
    return {"files": {field: (name, data, content_type)}}


def raw(data: bytes, content_type: str = "image/png"):
    return {"content": data, "headers": {"content-type": content_type}}


def chunked(data: bytes, content_type: str = "image/png"):
    """A body sent in chunks with no Content-Length, so only counting while streaming can catch it."""
    async def chunks():
        for start in range(0, len(data), 65536):
            yield data[start: start + 65536]

    return {"content": chunks(), "headers": {"content-type": content_type}}


def no_boundary():
    return {"content": images.png(), "headers": {"content-type": "multipart/form-data"}}


def malformed_multipart():
    return {"content": b"--xyz\r\nthis is not a part header\r\n\r\n--", "headers": {
        "content-type": "multipart/form-data; boundary=xyz"}}


def two_files():
    return {"files": [("file", ("a.png", images.png())), ("file", ("b.png", images.png(seed=1)))]}


HUGE = images.png() + b"\0" * (UPLOAD_LIMIT + 1)
gif, _ = images.animated_gif()
sixteen, _ = images.sixteen_bit_png()

# (case, request arguments, expected status): images that must work, then everything that must not.
CASES = [
    ("png-multipart", multipart(images.png()), 200),
    ("png-raw-body", raw(images.png()), 200),
    ("jpeg-sent-as-image/png", raw(images.jpeg(), "image/png"), 200),
    ("png-named-notes.txt", multipart(images.png(), "notes.txt", "text/plain"), 200),
    ("1x1-pixel", multipart(images.encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")), 200),
    ("cmyk-jpeg", multipart(images.cmyk_jpeg(), "c.jpg", "image/jpeg"), 200),
    ("16-bit-grayscale-png", multipart(sixteen), 200),
    ("palette-with-transparency", multipart(images.palette_with_transparency()), 200),
    ("transparent-rgba", multipart(images.transparent_rgba()), 200),
    ("gray-alpha", multipart(images.gray_alpha_png()), 200),
    ("animated-gif", multipart(gif, "a.gif", "image/gif"), 200),
    ("exif-rotated-jpeg", multipart(images.exif_rotated_jpeg(), "r.jpg", "image/jpeg"), 200),
    ("webp", raw(images.encode(Image.fromarray(images.pixels()), "WEBP"), "image/webp"), 200),
    ("bmp", raw(images.encode(Image.fromarray(images.pixels()), "BMP"), "image/bmp"), 200),
    ("tiff", raw(images.encode(Image.fromarray(images.pixels()), "TIFF"), "image/tiff"), 200),
    ("2048x2048-photo-at-the-pixel-limit", multipart(images.photo_jpeg(2048, 2048), "p.jpg", "image/jpeg"), 200),
    ("12-megapixel-photo-over-the-pixel-limit", multipart(images.photo_jpeg(), "p.jpg", "image/jpeg"), 413),
    ("empty-raw-body", raw(b""), 400),
    ("empty-file", multipart(b""), 400),
    ("no-body-no-content-type", {}, 400),
    ("missing-field", multipart(images.png(), field="image"), 400),
    ("two-files-to-/predict", two_files(), 400),
    ("multipart-without-boundary", no_boundary(), 400),
    ("malformed-multipart", malformed_multipart(), 400),
    ("text-file", multipart(images.TEXT, "a.txt", "text/plain"), 415),
    ("text/plain-body", raw(images.TEXT, "text/plain"), 415),
    ("json-body", raw(b'{"image": "cat"}', "application/json"), 415),
    ("octet-stream-body", raw(images.png(), "application/octet-stream"), 415),
    ("pdf", multipart(images.PDF, "doc.pdf", "application/pdf"), 415),
    ("svg", raw(images.SVG, "image/svg+xml"), 415),
    ("truncated-png", multipart(images.png(64, 64)[:300]), 415),
    ("truncated-jpeg", multipart(images.jpeg(64, 64)[:400], "t.jpg", "image/jpeg"), 415),
    ("corrupt-png", multipart(images.corrupt_png()), 415),
    ("random-bytes", raw(bytes(range(256)) * 8, "image/jpeg"), 415),
    ("10000x10000-bomb", multipart(images.bomb_png()), 413),
    ("huge-multipart", multipart(HUGE), 413),
    ("huge-raw-body", raw(HUGE), 413),
    ("huge-chunked-body-without-length", chunked(HUGE), 413),
]


@pytest.mark.parametrize(("case", "arguments", "status"), CASES, ids=[case for case, _, _ in CASES])
async def test_every_kind_of_input_gets_its_status_and_never_a_5xx(client, case, arguments, status):
    response = await client.post("/predict", **arguments)
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    if status == 200:
        assert_prediction(body, top_k=3)
    else:
        assert isinstance(body["detail"], str) and len(body["detail"]) > 20


@pytest.mark.parametrize("top_k", ["0", "11", "-1", "three"])
async def test_top_k_outside_1_to_10_is_refused(client, top_k):
    response = await client.post(f"/predict?top_k={top_k}", **multipart(images.png()))
    assert response.status_code == 422
    assert "top_k" in response.json()["detail"]


def assert_prediction(body: dict, top_k: int) -> None:
    assert set(body) == {"label", "index", "confidence", "probabilities", "top_k", "in_distribution", "ood_score",
                         "model_version"}
    probabilities = body["probabilities"]
    assert list(probabilities) == list(CLASS_NAMES)
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    best = max(probabilities, key=probabilities.get)
    assert body["label"] == best == CLASS_NAMES[body["index"]]
    assert body["confidence"] == probabilities[best]
    ranked = [entry["probability"] for entry in body["top_k"]]
    assert len(ranked) == top_k and ranked == sorted(ranked, reverse=True)
    assert body["top_k"][0]["label"] == best
    assert all(probabilities[entry["label"]] == entry["probability"] for entry in body["top_k"])


async def test_a_checkpoint_without_calibration_gives_no_ood_flag(client):
    body = (await client.post("/predict", **multipart(images.png()))).json()
    assert body["in_distribution"] is None and body["ood_score"] is None
    batch = (await client.post("/predict/batch", files=[("files", ("a.png", images.png()))])).json()
    assert [(p["in_distribution"], p["ood_score"]) for p in batch["predictions"]] == [(None, None)]


async def test_the_answer_names_the_served_model_and_honours_top_k(client):
    response = await client.post("/predict?top_k=7", **multipart(images.png()))
    assert_prediction(response.json(), top_k=7)
    assert response.json()["model_version"] == (await client.get("/model")).json()["version"]


async def test_the_same_image_by_multipart_and_raw_body_gets_the_same_answer(client):
    by_form = (await client.post("/predict", **multipart(images.png(seed=5)))).json()
    by_body = (await client.post("/predict", **raw(images.png(seed=5)))).json()
    assert by_form == by_body


async def test_exif_rotation_is_applied_before_the_model_sees_the_image(client):
    exif_jpeg = images.exif_rotated_jpeg()
    stored = Image.open(io.BytesIO(exif_jpeg)).convert("RGB")  # as stored, ignoring EXIF
    upright = images.encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG")
    sideways = images.encode(stored, "PNG")
    answer = (await client.post("/predict", **multipart(exif_jpeg, "r.jpg", "image/jpeg"))).json()
    as_upright = (await client.post("/predict", **multipart(upright))).json()
    as_sideways = (await client.post("/predict", **multipart(sideways))).json()
    assert answer["probabilities"] == pytest.approx(as_upright["probabilities"], abs=1e-6)
    assert answer["probabilities"] != pytest.approx(as_sideways["probabilities"], abs=1e-6)


async def test_a_batch_is_answered_in_upload_order_with_the_single_image_answers(client):
    uploads = [images.png(seed=seed) for seed in range(5)]
    singles = [(await client.post("/predict", **multipart(data))).json() for data in uploads]
    response = await client.post("/predict/batch?top_k=2",
                                 files=[("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(uploads)])
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [s["label"] for s in singles]
    for prediction, single in zip(predictions, singles):
        assert_prediction(prediction, top_k=2)
        assert prediction["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)
    assert len({p["model_version"] for p in predictions}) == 1


async def test_a_batch_over_the_file_limit_is_413(service):
    limit = service.app.state.settings.max_batch_files
    files = [("files", (f"{n}.png", images.png(8, 8), "image/png")) for n in range(limit + 1)]
    response = await service.client.post("/predict/batch", files=files)
    assert response.status_code == 413
    assert "APP_MAX_BATCH_FILES" in response.json()["detail"]


@pytest.mark.parametrize(("arguments", "status", "detail"), [
    ({"files": [("files", ("a.png", images.png())), ("files", ("b.txt", images.TEXT)),
                ("files", ("c.png", images.png()))]}, 415, "file 2 of 3"),
    ({"files": [("other", ("a.png", images.png()))]}, 400, "unexpected multipart field 'other'"),
    ({"files": [("files", ("a.png", b""))]}, 400, "empty"),
    (raw(images.png()), 415, "multipart/form-data"),
])
async def test_batch_errors_name_the_problem(client, arguments, status, detail):
    response = await client.post("/predict/batch", **arguments)
    assert response.status_code == status
    assert detail in response.json()["detail"]


async def test_the_batch_400_and_415_agree_that_raw_bytes_are_not_accepted(client):
    empty = {"content": b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}
    no_file = (await client.post("/predict/batch", **empty)).json()["detail"]
    raw_body = (await client.post("/predict/batch", **raw(images.png()))).json()["detail"]
    assert "raw" not in no_file and "image/*" not in no_file
    assert "multipart/form-data with the images in field 'files'" in no_file
    assert "multipart/form-data with the images in field 'files'" in raw_body


def empty_parts(count: int, field: str = "note") -> bytes:
    part = f'--b\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n\r\n'.encode()
    return part * count + b"--b--\r\n"


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
async def test_a_body_of_many_other_parts_is_refused_at_the_first(service, path):
    body = empty_parts(2_000)
    status, pulled, answer = await call_with_endless_body(
        service.app, path, [(b"content-type", b"multipart/form-data; boundary=b")], chunks=8, start=body,
        chunk=len(body))
    assert status == 400 and "unexpected multipart field 'note'" in answer["detail"]
    assert pulled == len(body), "the refusal came after the first chunk had been read"


async def test_only_the_file_field_is_accepted(client):
    body = empty_parts(1).removesuffix(b"--b--\r\n") + (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + images.png() +
        b"\r\n--b--\r\n")
    response = await client.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "send the image(s) in field 'file' and nothing else" in response.text


async def test_a_batch_over_the_pixel_budget_is_refused_from_the_headers(service):
    settings = service.app.state.settings
    side = int(math.isqrt(settings.max_image_pixels))  # each one within the per-image limit
    count = settings.max_request_pixels // (side * side) + 1
    assert count <= settings.max_batch_files
    # Headers that claim their size over a few bytes of data: only decoding would find them truncated (415).
    files = [("files", (f"{n}.png", images.bomb_png(side, side), "image/png")) for n in range(count)]
    response = await service.client.post("/predict/batch", files=files)
    assert response.status_code == 413, response.text
    assert "APP_MAX_REQUEST_PIXELS" in response.json()["detail"]


async def test_answers_do_not_depend_on_which_requests_share_a_batch(client):
    import anyio

    uploads = [images.png(seed=seed) for seed in range(12)]
    alone = [np.array(list((await client.post("/predict", **raw(d))).json()["probabilities"].values()))
             for d in uploads]
    together: list[np.ndarray | None] = [None] * len(uploads)

    async def send(index: int) -> None:
        body = (await client.post("/predict", **raw(uploads[index]))).json()
        together[index] = np.array(list(body["probabilities"].values()))

    async with anyio.create_task_group() as group:
        for index in range(len(uploads)):
            group.start_soon(send, index)
    for single, batched in zip(alone, together):
        assert np.allclose(single, batched, atol=1e-5)


TEMPERATURE = 2.5
TWO_IMAGES = [images.png(seed=11), images.png(32, 32, seed=12)]


def energies(checkpoint, uploads: list[bytes]) -> np.ndarray:
    """logsumexp of the logits, computed here from the checkpoint with the service's own stages 1-3."""
    loaded = load_checkpoint(checkpoint)
    card = loaded.card
    pixels = torch.from_numpy(np.stack([image_pixels(data, card.input_size, 10**8) for data in uploads]))
    batch = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(card.mean).view(1, 3, 1, 1)) \
        / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.logsumexp(loaded.model(batch), dim=1).numpy()


@pytest.fixture(scope="module")
async def calibrated_clients(tiny_checkpoint, tmp_path_factory):
    """Two services of one calibrated checkpoint, APP_CALIBRATION=on and off; its OOD threshold lies halfway
    between the energy scores of TWO_IMAGES, so one of them is in distribution and the other is not."""
    scores = energies(tiny_checkpoint, TWO_IMAGES)
    threshold = float(scores.mean())
    checkpoint = with_calibration(tiny_checkpoint, tmp_path_factory.mktemp("calibrated") / "ckpt",
                                  temperature=TEMPERATURE, threshold=threshold)
    async with running_app(service_settings(checkpoint)) as (_, on), \
            running_app(service_settings(checkpoint, calibration="off")) as (_, off):
        yield {"on": on, "off": off, "scores": scores, "threshold": threshold}


async def test_calibration_on_serves_the_temperature_scaled_softmax(calibrated_clients):
    on = (await calibrated_clients["on"].post("/predict?top_k=10", **multipart(TWO_IMAGES[0]))).json()
    off = (await calibrated_clients["off"].post("/predict?top_k=10", **multipart(TWO_IMAGES[0]))).json()
    assert_prediction(on, top_k=10)
    assert_prediction(off, top_k=10)
    # log p_off = logits - c, and softmax ignores c: so softmax(log p_off / T) is what "on" must serve.
    raw = torch.tensor(list(off["probabilities"].values()), dtype=torch.float64)
    expected = torch.softmax(raw.log() / TEMPERATURE, dim=0).tolist()
    assert list(on["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
    assert on["label"] == off["label"] and on["confidence"] < off["confidence"]


async def test_every_prediction_carries_the_ood_score_and_flag_of_the_cards_rule(calibrated_clients):
    scores, threshold = calibrated_clients["scores"], calibrated_clients["threshold"]
    for client in (calibrated_clients["on"], calibrated_clients["off"]):
        singles = [(await client.post("/predict", **multipart(data))).json() for data in TWO_IMAGES]
        batch = (await client.post("/predict/batch", files=[("files", (f"{n}.png", data, "image/png"))
                                                           for n, data in enumerate(TWO_IMAGES)])).json()
        for answers in (singles, batch["predictions"]):
            assert [a["ood_score"] for a in answers] == pytest.approx(scores.tolist(), abs=1e-4)
            assert [a["in_distribution"] for a in answers] == [bool(s >= threshold) for s in scores]
            assert sorted(a["in_distribution"] for a in answers) == [False, True]


async def test_model_shows_the_calibration_and_whether_it_is_applied(calibrated_clients, client):
    on = (await calibrated_clients["on"].get("/model")).json()["calibration"]
    off = (await calibrated_clients["off"].get("/model")).json()["calibration"]
    assert on["applied"] is True and off["applied"] is False
    assert on["temperature"] == TEMPERATURE and on["test_ece_before"] == 0.2 and on["test_ece_after"] == 0.01
    assert on["ood"]["score"] == "energy" and on["ood"]["threshold"] == pytest.approx(calibrated_clients["threshold"])
    assert on["fitted_on"] and on["ece_bins"] == 15
    assert (await client.get("/model")).json()["calibration"] is None, "the tiny checkpoint has none"
