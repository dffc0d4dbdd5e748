"""The classification pipeline end to end, without HTTP: uploads in, answers out."""

import asyncio
import threading
import time
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.classification import classifier as classifier_module
from app.classification.classifier import Classifier
from app.engine.engine import InferenceEngine
from app.engine.errors import NoModelLoaded, UnsupportedImage
from model.architectures import build_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.trust import assess
from tests.support import images
from tests.support.checkpoints import make_checkpoint, with_feature_rule, with_input_size
from tests.support.service import running_app, service_settings
from tests.support.waiting import eventually
from training.ood_features import outputs_of

pytestmark = pytest.mark.anyio
LIMIT = 40_000_000


@asynccontextmanager
async def pipeline(checkpoint: Path | None, **engine_options):
    options = dict(max_batch_size=8, max_batch_delay_s=0.0, max_queue=64) | engine_options
    engine = InferenceEngine(torch.device("cpu"), **options)
    await engine.start()
    classifier = Classifier(engine, decode_threads=2, max_image_pixels=LIMIT)
    try:
        if checkpoint is not None:
            await engine.swap(checkpoint)
        yield classifier
    finally:
        classifier.close()
        await engine.stop(timeout=30)


def deadline() -> float:
    return time.monotonic() + 30


async def test_uploads_are_answered_in_order_with_the_single_upload_answers(tiny_checkpoint):
    uploads = [images.png(seed=seed) for seed in range(3)]
    async with pipeline(tiny_checkpoint) as classifier:
        singles = [(await classifier.classify([data], deadline=deadline(), top_k=3))[0] for data in uploads]
        together = await classifier.classify(uploads, deadline=deadline(), top_k=2)
    assert len(together) == 3
    for single, batched in zip(singles, together):
        assert batched.probabilities == pytest.approx(single.probabilities, abs=1e-5)
        assert len(batched.top_k) == 2 and batched.model_version == single.model_version


async def test_the_first_bad_upload_is_named_by_its_place(tiny_checkpoint):
    async with pipeline(tiny_checkpoint) as classifier:
        with pytest.raises(UnsupportedImage, match="^file 2 of 3: "):
            await classifier.classify([images.png(), images.TEXT, images.png()], deadline=deadline(), top_k=3)


async def test_without_a_model_nothing_is_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(classifier_module, "image_pixels", lambda *args: decoded.append(args))
    async with pipeline(None) as classifier:
        classifier.engine.unavailable_reason = "no model: train one"
        with pytest.raises(NoModelLoaded, match="train one"):
            await classifier.classify([images.png()], deadline=deadline(), top_k=3)
    assert decoded == []


async def test_a_request_waiting_while_a_model_of_another_input_size_takes_over_is_fitted_again(
        tiny_checkpoint, tmp_path):
    larger = with_input_size(tiny_checkpoint, tmp_path / "64px", 64)
    upload = images.png(96, 96)
    # The request waits up to 30 s for company, so the swap lands while it is queued, before it is computed.
    async with pipeline(tiny_checkpoint, max_batch_delay_s=30.0) as classifier:
        engine = classifier.engine
        request = asyncio.ensure_future(classifier.classify([upload], deadline=deadline(), top_k=3))
        give_up = time.monotonic() + 30
        while engine.queued_images == 0:
            assert time.monotonic() < give_up, "the request never reached the queue"
            await asyncio.sleep(0.01)
        engine.max_batch_delay_s = 0.0  # the request fitted again goes at once
        await engine.swap(larger)
        (answer,) = await request
        (fitted_to_64,) = await classifier.classify([upload], deadline=deadline(), top_k=3)
        assert engine.input_size == 64
    assert answer.probabilities == pytest.approx(fitted_to_64.probabilities, abs=1e-5)


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    """A checkpoint whose weights are finite but so large that every forward pass overflows to inf and NaN:
    what a diverging run could still save (checkpoints with non-finite weights are refused at load)."""
    torch.manual_seed(0)
    network = build_model("resnet18")
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.fill_(1e30)
    directory = tmp_path_factory.mktemp("nan-checkpoint")
    save_checkpoint(network, directory, architecture="resnet18", test_accuracy=0.1)
    return directory


@pytest.mark.anyio
async def test_non_finite_outputs_are_never_answered_with_200(nan_checkpoint):
    png = images.png(seed=5)
    pixels = images.pixels(32, 32, seed=5)
    infer = {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                         "data": pixels.ravel().tolist()}]}
    async with running_app(service_settings(nan_checkpoint)) as (_, client):
        single = await client.post("/predict", content=png, headers={"content-type": "image/png"})
        batch = await client.post("/predict/batch", files=[("files", ("a.png", png, "image/png"))] * 2)
        v2 = await client.post("/v2/models/resnet18/infer", json=infer)
    for response in (single, batch):
        assert response.status_code == 500, response.text
        assert "NaN or infinite" in response.json()["detail"]
    assert v2.status_code == 500 and "NaN or infinite" in v2.json()["error"]


REFUSED_WITHIN_S = 60.0  # a guard, not a measurement: a refusal takes milliseconds, a wrongly queued request forever


class HeldDecodes:
    """Decodes that wait for ``release``; ``started`` counts those a decode thread began."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = 0

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def held_decodes(monkeypatch):
    held = HeldDecodes()
    decode = classifier_module.image_pixels

    def held_decode(*args):
        held.started += 1
        held.gate.wait()
        return decode(*args)

    monkeypatch.setattr(classifier_module, "image_pixels", held_decode)
    yield held
    held.release()  # a failed test must not leave a decode thread waiting for good


async def test_past_the_decode_queue_bound_requests_get_503_with_retry_after_and_are_served_once_it_drains(
        tiny_checkpoint, held_decodes):
    """APP_MAX_DECODE_QUEUE=2 images with one decode thread, held busy: the bound counts images (a batch of
    two does not fit beside one waiting, a single image does), past it /predict, /predict/batch and v2 infer
    are refused at once with Retry-After, and every request is served once the decodes go on."""
    settings = service_settings(tiny_checkpoint, decode_threads=1, max_decode_queue=2, max_batch_files=2)
    pixels = images.pixels(32, 32, seed=9)
    infer = {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                         "data": pixels.ravel().tolist()}]}
    pair = [("files", (f"{seed}.png", images.png(seed=seed), "image/png")) for seed in (3, 4)]

    def single(seed: int):
        return client.post("/predict", content=images.png(seed=seed), headers={"content-type": "image/png"})

    def at_once(request):
        """A refusal comes without waiting for the held decode; one that waited would never come."""
        return asyncio.wait_for(request, REFUSED_WITHIN_S)

    async with running_app(settings) as (app, client):
        classifier = app.state.classifier
        first = asyncio.ensure_future(single(1))
        await eventually(lambda: held_decodes.started == 1, what="the first image's decode to start")
        batch_refused = await at_once(client.post("/predict/batch", files=pair))
        second = asyncio.ensure_future(single(2))
        await eventually(lambda: classifier._decoding == 2, what="the second image to wait for the decode thread")
        refused = await at_once(single(5))
        v2_refused = await at_once(client.post("/v2/models/resnet18/infer", json=infer))
        assert not first.done() and not second.done()
        held_decodes.release()
        served = [await first, await second]
        after = [await single(6), await client.post("/predict/batch", files=pair),
                 await client.post("/v2/models/resnet18/infer", json=infer)]
    for response in (batch_refused, refused):
        assert response.status_code == 503, response.text
        assert "APP_MAX_DECODE_QUEUE" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
    assert v2_refused.status_code == 503 and "APP_MAX_DECODE_QUEUE" in v2_refused.json()["error"]
    assert v2_refused.headers["retry-after"] == "1"
    assert [response.status_code for response in served + after] == [200] * 5, [r.text for r in served + after]
    assert len(after[1].json()["predictions"]) == 2
    assert classifier._decoding == 0, "every image handed to the decode threads was counted out again"


async def test_the_served_ood_flag_is_the_offline_flag_of_a_feature_rule(tmp_path):
    """The engine hands the classifier the features of the same forward pass, so /predict's flag and score
    for an image are those model.trust gives offline (training.ood_features.outputs_of) for its pixels."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(96, 3, 4, 4, generator=generator) * 255
    photos = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round().to(torch.uint8)
    checkpoint = with_feature_rule(make_checkpoint(tmp_path / "plain", architecture="resnet20"),
                                   tmp_path / "features", photos)
    noise = torch.randint(0, 256, (4, 3, 32, 32), generator=generator, dtype=torch.uint8)
    pixels = torch.cat([photos[:6], noise])
    uploads = [images.encode(Image.fromarray(image.permute(1, 2, 0).numpy()), "PNG") for image in pixels]
    async with pipeline(checkpoint) as classifier:
        served = await classifier.classify(uploads, deadline=deadline(), top_k=1)
    loaded = load_checkpoint(checkpoint)
    outputs = outputs_of(loaded.model, pixels, torch.device("cpu"), nullcontext)
    offline = assess(outputs.logits, loaded.card.calibration, features=outputs.features,
                     statistics=loaded.ood_statistics)
    assert [answer.in_distribution for answer in served] == offline.in_distribution.tolist()
    assert [answer.ood_score for answer in served] == pytest.approx(offline.score.tolist(), abs=1e-3)
    assert not any(answer.in_distribution for answer in served[6:]), "pixel noise is far from every photo"
    assert any(answer.in_distribution for answer in served[:6]), "images it was fitted on pass"
