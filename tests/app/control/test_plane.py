from pathlib import Path

from fastapi.testclient import TestClient

from app.control.plane import InitialModel, best_shipped_checkpoint, initial_model
from app.control.registry import ModelRegistry
from app.factory import create_app
from model.card import CARD_FILE, read_card, write_card
from tests.support.checkpoints import make_checkpoint
from tests.support.service import ADMIN
from tests.support.training_api import FINISHED, TINY_JOB, job_settings, wait_for_status, wait_ready
from tests.support.waiting import wait_until


def test_a_replica_serves_what_another_promoted_through_the_shared_registry(tmp_path: Path,
                                                                             tiny_checkpoint: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tiny_checkpoint, run_jobs=False,
                            registry_poll_s=0.1)
    registry = ModelRegistry(settings.registry_path)
    version = registry.register(make_checkpoint(tmp_path / "other", seed=5)).version
    with TestClient(create_app(settings)) as replica:
        assert wait_ready(replica) != version
        registry.set_current(version)  # what the job runner's promotion does, from another process
        wait_until(lambda: replica.get("/model").json()["version"] == version, what="the replica to follow")
        assert replica.get("/models").json()["serving"] == version
        assert replica.post("/train/x/resume", headers=ADMIN).status_code == 503
        assert replica.get("/healthz").json()["job_runner"] == "off"


def _shipped(root: Path, accuracies: dict[str, float | None]) -> Path:
    for seed, (name, accuracy) in enumerate(accuracies.items()):
        make_checkpoint(root / name, seed=seed)
        card = read_card(root / name)
        write_card(card.model_copy(update={"test_accuracy": accuracy}), root / name / CARD_FILE)
    return root


def test_start_up_serves_the_registrys_current_version_else_app_weights_else_the_best_shipped(
        tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    shipped = _shipped(tmp_path / "weights", {"cpu-model": 0.92, "gpu-model": 0.95})
    chosen = initial_model(registry, None, shipped)
    assert chosen.path == shipped / "gpu-model" and "shipped default" in chosen.origin
    assert initial_model(registry, tiny_checkpoint, shipped) == InitialModel(tiny_checkpoint, "APP_WEIGHTS")
    version = registry.register(tiny_checkpoint).version
    registry.set_current(version)
    chosen = initial_model(registry, tmp_path / "elsewhere", shipped)
    assert chosen.path == registry.path(version) and version in chosen.origin
    (registry.root / "current").write_text("resnet18-gone00000000\n")
    assert initial_model(registry, tiny_checkpoint, shipped).path == tiny_checkpoint


def test_the_best_shipped_checkpoint_is_the_most_accurate_readable_one(tmp_path: Path) -> None:
    root = _shipped(tmp_path / "weights", {"a": 0.80, "b": None, "c": 0.91, "d": 0.99})
    (root / "d" / CARD_FILE).write_text("{not json")
    (root / "no-card").mkdir()
    assert best_shipped_checkpoint(root) == root / "c"
    assert best_shipped_checkpoint(tmp_path / "absent") is None
    chosen = initial_model(ModelRegistry(tmp_path / "registry"), None, tmp_path / "absent")
    assert chosen.path is None and "no shipped checkpoint" in chosen.origin


def test_a_current_version_that_fails_to_load_falls_back_to_the_previous_one(tmp_path: Path,
                                                                             tiny_checkpoint: Path) -> None:
    settings = job_settings(tmp_path / "state", tmp_path / "data", tiny_checkpoint, run_jobs=False)
    registry = ModelRegistry(settings.registry_path)
    previous = registry.register(make_checkpoint(tmp_path / "previous", seed=3)).version
    broken = registry.register(make_checkpoint(tmp_path / "broken", seed=4)).version
    registry.set_current(previous)
    registry.set_current(broken)
    weights = registry.path(broken) / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"\0" * weights.stat().st_size)  # bit rot: its SHA-256 no longer matches its card
    with TestClient(create_app(settings)) as replica:
        assert wait_ready(replica) == previous
        assert "previous" in replica.get("/model").json()["origin"]
    # Without a previous version, what would be served with no registry at all.
    registry.root.joinpath("previous").unlink()
    assert initial_model(registry, tiny_checkpoint).fallback == InitialModel(tiny_checkpoint, "APP_WEIGHTS")


def test_an_unreadable_pointer_at_start_up_starts_without_the_registry(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    (registry.root / "current").write_bytes(b"\xff\xfe not utf-8\n")
    assert initial_model(registry, tiny_checkpoint) == InitialModel(tiny_checkpoint, "APP_WEIGHTS")
    assert initial_model(None, tiny_checkpoint) == InitialModel(tiny_checkpoint, "APP_WEIGHTS")


def test_replicas_sharing_postgresql_and_the_registry_see_one_runner_its_jobs_and_its_promotion(
        tmp_path: Path, postgres_url: str, synthetic_cifar10: Path, tiny_checkpoint: Path) -> None:
    # Separate state directories: only the database and the registry are shared, as between pods.
    shared = dict(database_url=postgres_url, registry_dir=tmp_path / "registry", registry_poll_s=0.1,
                  promote="always")
    first = job_settings(tmp_path / "state-a", synthetic_cifar10, tiny_checkpoint, **shared)
    second = job_settings(tmp_path / "state-b", synthetic_cifar10, tiny_checkpoint, **shared)
    with TestClient(create_app(first)) as runner:
        # The first control plane is elected before the second starts, so which one runs jobs is certain.
        wait_until(lambda: runner.get("/healthz").json()["job_runner"] == "runner", what="the first to be elected")
        with TestClient(create_app(second)) as standby:
            before = wait_ready(standby)
            _shares_one_runner(runner, standby, tmp_path, before)


def _shares_one_runner(runner: TestClient, standby: TestClient, tmp_path: Path, before: str) -> None:
    wait_until(lambda: standby.get("/healthz").json()["job_runner"] == "standby", what="the second to stand by")
    assert runner.get("/healthz").json()["job_runner"] == "runner"

    queued = standby.post("/train", json=TINY_JOB, headers=ADMIN)  # queued here, run by the runner
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    done = wait_for_status(standby, job_id, *FINISHED)
    assert done["status"] == "succeeded" and done["result"]["promoted"], done
    assert (tmp_path / "state-a" / "runs" / job_id / "checkpoint").is_dir()
    assert not (tmp_path / "state-b" / "runs" / job_id).exists()
    assert [j["id"] for j in runner.get("/train", headers=ADMIN).json()] == [job_id]

    version = done["result"]["model_version"]
    assert version != before
    for replica in (runner, standby):
        wait_until(lambda r=replica: r.get("/model").json()["version"] == version,
                   what="both replicas to serve the promoted version")
