import shutil

import anyio
import pytest

from app.control.registry import ModelRegistry
from model.backend_report import machine_identity
from tests.app.engine.test_backend_choice import CPU_ROWS, measured
from tests.support import images
from tests.support.service import ADMIN_TOKEN, running_app, service_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize(("headers", "status", "detail"), [
    ({}, 401, "Authorization: Bearer"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, 401, "Authorization: Bearer"),
    ({"authorization": "Bearer wrong-token-but-long-enough"}, 403, "wrong"),
    ({"authorization": f"Bearer {ADMIN_TOKEN}x"}, 403, "wrong"),
    ({"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 403, "wrong"),
])
async def test_reload_needs_the_right_bearer_token(client, headers, status, detail):
    response = await client.post("/admin/reload", headers=headers)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


async def test_without_a_configured_token_admin_routes_are_disabled(tiny_checkpoint):
    async with running_app(service_settings(tiny_checkpoint, admin_token=None)) as (_, client):
        for headers in ({}, AUTH, {"authorization": "Bearer "}):
            response = await client.post("/admin/reload", headers=headers)
            assert response.status_code == 403
            assert "APP_ADMIN_TOKEN" in response.json()["detail"]


async def test_reload_swaps_to_the_given_checkpoint_and_back_to_the_configured_one(service, other_checkpoint,
                                                                                   tiny_checkpoint):
    client = service.client
    first = (await client.get("/model")).json()["version"]
    response = await client.post("/admin/reload", headers=AUTH, json={"weights": str(other_checkpoint)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["previous_version"] == first and body["model_version"] != first
    assert body["weights"] == str(other_checkpoint)
    prediction = await client.post("/predict", files={"file": ("a.png", images.png(), "image/png")})
    assert prediction.json()["model_version"] == body["model_version"]
    back = (await client.post("/admin/reload", headers=AUTH)).json()  # no body: APP_WEIGHTS
    assert back["model_version"] == first and back["weights"] == str(tiny_checkpoint)


async def test_reload_changes_this_replica_only_and_never_writes_the_registry(service, other_checkpoint):
    # Serving replicas only read the registry (issue 22): moving the pointer is the control plane's promotion.
    client = service.client
    registry = ModelRegistry(service.app.state.settings.registry_path)
    before = registry.current()
    response = await client.post("/admin/reload", headers=AUTH, json={"weights": str(other_checkpoint)})
    assert response.status_code == 200, response.text
    assert registry.current() == before and registry.versions() == []
    # By registry version, too: a version the control plane registered.
    version = registry.register(other_checkpoint).version
    first = (await client.post("/admin/reload", headers=AUTH)).json()["model_version"]
    again = await client.post("/admin/reload", headers=AUTH, json={"version": version})
    assert again.status_code == 200 and again.json()["model_version"] == version
    assert (await client.get("/model")).json()["version"] == version and registry.current() == before
    assert (await client.post("/admin/reload", headers=AUTH, json={"version": "resnet18-ffffffffffff"})
            ).status_code == 404
    await client.post("/admin/reload", headers=AUTH, json={"weights": None})
    assert (await client.get("/model")).json()["version"] == first


@pytest.mark.parametrize("outside", ["/etc", "/nonexistent/checkpoint", "{other}/../../..", "nul\x00byte"])
async def test_a_path_outside_the_allowed_folders_is_refused_before_it_is_read(client, other_checkpoint, outside):
    response = await client.post("/admin/reload", headers=AUTH,
                                 json={"weights": outside.format(other=other_checkpoint)})
    assert response.status_code == 400
    assert "APP_RELOAD_ROOTS" in response.json()["detail"]


async def test_a_reload_error_never_shows_the_file_contents(client, other_checkpoint):
    secret = other_checkpoint / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "card.json").write_text('{"architecture": "hunter2-the-password", "weights_sha256": "s3cr3t"}')
    response = await client.post("/admin/reload", headers=AUTH, json={"weights": str(secret)})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "weights_sha256" in detail and "hunter2" not in detail and "s3cr3t" not in detail


@pytest.mark.parametrize(("weights", "detail"), [("{other}/nothing-here", "no model card"),
                                                 ("{other}/empty", "no model card")])
async def test_a_bad_checkpoint_is_a_400_and_the_old_model_keeps_serving(client, weights, detail,
                                                                         other_checkpoint):
    (other_checkpoint / "empty").mkdir(exist_ok=True)
    before = (await client.get("/model")).json()["version"]
    body = {"weights": weights.format(other=other_checkpoint)}
    response = await client.post("/admin/reload", headers=AUTH, json=body)
    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert (await client.get("/model")).json()["version"] == before
    assert (await client.post("/predict", content=images.png(), headers={"content-type": "image/png"})
            ).status_code == 200


async def test_reload_under_concurrent_requests_fails_none_and_never_goes_back(service, other_checkpoint,
                                                                              tiny_checkpoint):
    client = service.client
    old = (await client.get("/model")).json()["version"]
    sequences: list[list[str]] = []
    statuses: list[int] = []
    swapped = anyio.Event()

    async def keep_predicting() -> None:
        versions: list[str] = []
        sequences.append(versions)
        for _ in range(200):
            response = await client.post("/predict", content=images.png(), headers={"content-type": "image/png"})
            statuses.append(response.status_code)
            versions.append(response.json().get("model_version"))
            if swapped.is_set() and versions[-1] != old:
                return

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(keep_predicting)
        await eventually(lambda: len(sequences) == 4 and all(sequences), what="every client's first answer")
        reload = await client.post("/admin/reload", headers=AUTH, json={"weights": str(other_checkpoint)})
        swapped.set()
    new = reload.json()["model_version"]
    assert set(statuses) == {200}
    for versions in sequences:  # each client sees the old version, then the new one, never back
        switch = versions.index(new)
        assert set(versions[:switch]) <= {old} and set(versions[switch:]) == {new}
    await client.post("/admin/reload", headers=AUTH, json={"weights": str(tiny_checkpoint)})


async def test_a_reloaded_checkpoint_serves_the_backend_its_own_report_verified(tiny_checkpoint, tmp_path):
    """A reload serves the registry's copy of the checkpoint, which must keep its backend report: without
    it auto fell back to fused after every reload and promotion."""
    verified = shutil.copytree(tiny_checkpoint, tmp_path / "verified")
    measured(verified, *CPU_ROWS, machine=machine_identity("cpu"))  # bf16: fastest within the allowed drop
    async with running_app(service_settings(tiny_checkpoint, reload_roots=[tmp_path])) as (_, client):
        assert (await client.get("/model")).json()["backend"] == "fused"  # no report next to tiny_checkpoint
        response = await client.post("/admin/reload", headers=AUTH, json={"weights": str(verified)})
        assert response.status_code == 200, response.text
        served = (await client.get("/model")).json()
        assert served["backend"] == "bf16", served["backend_reason"]
        assert served["backend_test_accuracy"] == CPU_ROWS[2].accuracy
