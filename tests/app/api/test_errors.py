"""What a 5xx answer tells a caller without the admin token (issue 22, item 7; ``app/api/errors.py``): the
reason, with each absolute path cut to its last part, and never an exception's own text, which stays in the
log. Checked on the routes a load balancer or an anonymous client calls: /readyz, /healthz, /predict,
/predict/batch, /explain and the KServe v2 routes."""

import pytest

import app.engine.served_model as served_model
from app.engine.served_model import ServedModel
from tests.support import images
from tests.support.service import ADMIN, running_app, service_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio
INFER = "/v2/models/resnet18/infer"  # tiny_checkpoint's architecture


def png() -> dict:
    return {"content": images.png(), "headers": {"content-type": "image/png"}}


def infer_body() -> dict:
    pixels = images.pixels(32, 32, seed=0)
    return {"json": {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                                 "data": pixels.ravel().tolist()}]}}


async def anonymous_answers(client) -> dict:
    """Each route's answer to a caller without the token, by route."""
    return {
        "/readyz": await client.get("/readyz"),
        "/v2/health/ready": await client.get("/v2/health/ready"),
        "/predict": await client.post("/predict", **png()),
        "/predict/batch": await client.post("/predict/batch", files=[("files", ("a.png", images.png()))] * 2),
        "/explain": await client.post("/explain", **png()),
        INFER: await client.post(INFER, **infer_body()),
    }


def reason(response) -> str:
    body = response.json()
    return body.get("detail") or body["error"]


async def test_without_a_model_the_503s_name_the_missing_checkpoint_by_its_last_part_only(tmp_path):
    missing = tmp_path / "weights" / "resnet50"
    async with running_app(service_settings(missing), wait_ready=False) as (_, client):
        answers = await anonymous_answers(client)
        alive = await client.get("/healthz")
        admin = await client.get("/readyz", headers=ADMIN)
    for route, response in answers.items():
        assert response.status_code == 503, (route, response.text)
        assert str(tmp_path) not in response.text and "…/resnet50" in reason(response), (route, response.text)
        assert response.headers["retry-after"], route
    assert alive.status_code == 200 and str(tmp_path) not in alive.text
    assert str(missing) in reason(admin), "the reason does name the path, for an admin"


async def test_a_model_that_cannot_be_prepared_is_reported_without_the_exceptions_text(
        tiny_checkpoint, tmp_path, monkeypatch):
    """The backend fails to build (a torch error, which may name files of this machine): anonymous callers
    learn that the checkpoint could not be served and what to do, not the error; an admin reloading it
    gets the error in the 422."""
    secret = f"simulated backend failure in {tmp_path}/kernels/fbgemm.so"

    def failing_preparation(*args, **kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(served_model, "prepare_for_inference", failing_preparation)
    async with running_app(service_settings(tiny_checkpoint), wait_ready=False) as (app, client):
        engine = app.state.engine
        await eventually(lambda: "could not be served" in engine.unavailable_reason,
                         what="the checkpoint to be tried")
        answers = await anonymous_answers(client)
        reload = await client.post("/admin/reload", json={"path": str(tiny_checkpoint)}, headers=ADMIN)
    for route, response in answers.items():
        assert response.status_code == 503, (route, response.text)
        text = reason(response)
        assert "simulated backend failure" not in text and str(tmp_path) not in text, (route, text)
        assert f"…/{tiny_checkpoint.name} could not be served" in text and "POST /admin/reload" in text, text
    assert reload.status_code == 422 and secret in reload.json()["detail"], reload.text


async def test_a_forward_pass_that_raises_is_a_500_without_the_exceptions_text(tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    secret = f"simulated kernel failure reading {tmp_path}/weights.bin"
    async with running_app(service_settings(tiny_checkpoint)) as (_, client):
        def failing_pass(self, batch):
            raise RuntimeError(secret)

        monkeypatch.setattr(ServedModel, "outputs", failing_pass)
        answers = await anonymous_answers(client)
        ready = await client.get("/readyz")
    del answers["/readyz"], answers["/v2/health/ready"]  # 200: see below
    for route, response in answers.items():
        assert response.status_code == 500, (route, response.text)
        assert "simulated kernel failure" not in response.text and str(tmp_path) not in response.text, route
        assert "X-Request-ID" in reason(response) or "request ID" in reason(response), (route, response.text)
    assert ready.status_code == 200, "one failed batch leaves the service ready"
