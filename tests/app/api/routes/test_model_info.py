import pytest

from model.card import read_card
from model.labels import CLASS_NAMES
from tests.support.service import ADMIN

pytestmark = pytest.mark.anyio


async def test_model_describes_the_card_the_device_and_the_batching(service, tiny_checkpoint):
    card = read_card(tiny_checkpoint)
    body = (await service.client.get("/model")).json()
    assert body["version"] == card.version and body["architecture"] == "resnet18"
    assert body["class_names"] == list(CLASS_NAMES)
    assert body["parameter_count"] == card.parameter_count
    assert body["test_accuracy"] == card.test_accuracy
    assert body["trained_at"].startswith(card.created_at.strftime("%Y-%m-%dT%H:%M"))
    assert body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["backend"] == "fused" and body["backend_reason"].startswith("fused, the exact float32 backend: no "
                                                                            "backend report"), body["backend_reason"]
    assert body["backend_test_accuracy"] is None  # no report verified it: the card's float32 figure holds
    assert body["origin"] == "APP_WEIGHTS", "the fixture serves the checkpoint its settings name"
    settings = service.app.state.settings
    assert body["batching"] == {
        "max_batch_size": settings.max_batch_size, "max_batch_delay_ms": settings.max_batch_delay_ms,
        "max_queue": settings.max_queue, "parallel_batches": 1, "request_timeout_s": settings.request_timeout_s,
    }


async def test_model_says_where_the_backends_self_verification_stands_and_why(service):
    """The fixture's checkpoint has no verification set: the reference keeps serving, and /model says how to
    get one; the CPU features are those the ISA masks leave (app/engine/self_verification.py)."""
    from model.backend_report import machine_identity

    status = (await service.client.get("/model")).json()["backend_verification"]
    assert status["phase"] == "kept_reference"
    assert "verification.safetensors" in status["summary"] and "fused keeps serving" in status["summary"]
    assert status["features"] == list(machine_identity("cpu").features)
    assert status["backends"] == [] and status["chosen"] is None


async def test_model_publishes_the_request_limits(service):
    settings = service.app.state.settings
    assert (await service.client.get("/model")).json()["limits"] == {
        "max_upload_bytes": settings.max_upload_bytes, "max_batch_files": settings.max_batch_files,
        "max_image_pixels": settings.max_image_pixels, "max_request_pixels": settings.max_request_pixels,
        "max_queue": settings.max_queue, "max_json_bytes": settings.max_json_bytes,
    }


async def test_absolute_paths_are_shown_to_admins_only(client, tiny_checkpoint):
    public = (await client.get("/model")).json()
    admin = (await client.get("/model", headers=ADMIN)).json()
    assert str(tiny_checkpoint) in admin["backend_reason"], "the fixture's reason names its checkpoint"
    assert str(tiny_checkpoint) not in public["backend_reason"]
    assert f"…/{tiny_checkpoint.name}" in public["backend_reason"]
