import re

import pytest

from tests.support import images
from tests.support.service import ADMIN, running_app, service_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


async def test_alive_and_ready_with_a_warm_model(client):
    alive = await client.get("/healthz")
    assert alive.status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == (await client.get("/model")).json()["version"]
    assert alive.json()["model_version"] == ready.json()["model_version"], "healthz names the served model too"


async def test_without_a_model_the_service_lives_but_is_not_ready_and_says_how_to_get_one(tmp_path):
    missing = tmp_path / "weights" / "resnet50"
    async with running_app(service_settings(missing), wait_ready=False) as (_, client):
        alive = await client.get("/healthz")
        assert alive.status_code == 200 and alive.json()["model_version"] is None
        for path in ("/readyz", "/model"):
            response = await client.get(path)
            assert response.status_code == 503
        response = await client.post("/predict", files={"file": ("a.png", images.png(), "image/png")})
        assert response.status_code == 503
        detail = response.json()["detail"]
        assert "python -m training" in detail and "APP_WEIGHTS" in detail and "POST /admin/reload" in detail
        assert response.headers["retry-after"]
        # Where the service keeps its files is for operators: the admin token shows it, others get its last part.
        assert str(missing) not in detail and "…/resnet50" in detail
        admin = await client.post("/predict", files={"file": ("a.png", images.png(), "image/png")}, headers=ADMIN)
        assert str(missing) in admin.json()["detail"]


async def test_a_broken_checkpoint_leaves_the_service_up_and_says_what_is_wrong(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    async with running_app(service_settings(broken), wait_ready=False) as (app, client):
        engine = app.state.engine
        await eventually(lambda: "loading" not in engine.unavailable_reason and "yet" not in engine.unavailable_reason,
                         what="the broken checkpoint to be tried")
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "card" in response.json()["detail"] and "not valid" in response.json()["detail"]


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} is not in /metrics"
    return float(match.group(1))


async def test_metrics_count_requests_by_route_and_status_and_describe_batches(client):
    before = (await client.get("/metrics")).text
    ok = metric(before, "http_requests_total", '{method="POST",route="/predict",status="200"}') \
        if 'route="/predict",status="200"' in before else 0.0
    await client.post("/predict", files={"file": ("a.png", images.png(), "image/png")})
    await client.post("/predict", content=images.TEXT, headers={"content-type": "image/png"})
    await client.get("/no/such/path/123")
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "http_requests_total", '{method="POST",route="/predict",status="200"}') == ok + 1
    assert metric(text, "http_requests_total", '{method="POST",route="/predict",status="415"}') >= 1
    assert metric(text, "http_requests_total", '{method="GET",route="unmatched",status="404"}') >= 1
    assert "/no/such/path" not in text, "raw paths must not become labels"
    assert metric(text, "http_request_duration_seconds_count", '{route="/predict"}') >= 2
    assert metric(text, "inference_batch_images_count") >= 1
    assert metric(text, "inference_forward_seconds_count") >= 1
    assert metric(text, "inference_queue_images") == 0
    assert re.search(r'^model_info\{.*version="resnet18-[0-9a-f]{12}".*\} 1\.0$', text, re.MULTILINE)


async def test_each_app_has_its_own_metrics_registry(service, tiny_checkpoint):
    async with running_app(service_settings(tiny_checkpoint)) as (other, _):
        assert other.state.metrics.registry is not service.app.state.metrics.registry
