from pathlib import Path

from fastapi.testclient import TestClient

from app.factory import create_app
from app.control.plane import initial_weights
from app.control.registry import ModelRegistry
from tests.support.checkpoints import make_checkpoint
from tests.support.training_api import ADMIN, job_settings, wait_ready, wait_until


def test_a_replica_serves_what_another_promoted_through_the_shared_registry(tmp_path: Path,
                                                                             tiny_checkpoint: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tiny_checkpoint, run_jobs=False,
                            registry_poll_s=0.1)
    registry = ModelRegistry(settings.registry_path)
    version = registry.register(make_checkpoint(tmp_path / "other", seed=5)).version
    with TestClient(create_app(settings)) as replica:
        assert wait_ready(replica) != version
        registry.set_current(version)  # what the job runner's promotion does, from another process
        wait_until(lambda: replica.get("/model").json()["version"] == version, 20, "the replica to follow")
        assert replica.get("/models").json()["serving"] == version
        assert replica.post("/train/x/resume", headers=ADMIN).status_code == 503


def test_start_up_serves_the_registrys_current_version_else_app_weights(tmp_path: Path,
                                                                        tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    assert initial_weights(registry, tiny_checkpoint) == tiny_checkpoint
    version = registry.register(tiny_checkpoint).version
    registry.set_current(version)
    assert initial_weights(registry, tmp_path / "elsewhere") == registry.path(version)
    (registry.root / "current").write_text("resnet18-gone00000000\n")
    assert initial_weights(registry, tiny_checkpoint) == tiny_checkpoint
