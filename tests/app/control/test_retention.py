from pathlib import Path

import pytest

from app.control.jobs.schemas import JobStatus, TrainParams
from app.control.jobs.sqlite_store import SQLiteJobStore
from app.control.jobs.store import JobStore, this_host
from app.control.registry import ModelRegistry
from app.control.retention import prune, prune_runs, verify_kept
from tests.support.checkpoints import make_checkpoint


def jobs_with_runs(tmp_path: Path, count: int) -> tuple[JobStore, Path, list[str]]:
    store, runs = SQLiteJobStore(tmp_path / "jobs.db"), tmp_path / "runs"
    ids = []
    for _ in range(count):
        job = store.create(TrainParams())
        store.finish(job.id, JobStatus.SUCCEEDED)
        (runs / job.id).mkdir(parents=True)
        (runs / job.id / "train.log").write_text("done\n")
        ids.append(job.id)
    return store, runs, ids


def test_the_newest_runs_stay_and_an_active_job_dir_is_never_deleted(tmp_path: Path) -> None:
    store, runs, ids = jobs_with_runs(tmp_path, 4)
    running = store.create(TrainParams())
    assert store.claim(running.id, this_host())
    store.record_process(running.id, 1, None)
    (runs / running.id).mkdir()
    assert prune_runs(store, runs, keep=0) == []
    # keep=2: the two newest jobs are the running one and ids[3]; ids[0..2] go.
    assert sorted(prune_runs(store, runs, keep=2)) == sorted(ids[:3])
    assert sorted(p.name for p in runs.iterdir()) == sorted([ids[3], running.id])
    assert store.get(ids[0]) is not None  # the record stays


def test_retention_prunes_both_and_a_failure_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, runs, ids = jobs_with_runs(tmp_path, 3)
    registry = ModelRegistry(tmp_path / "registry")
    for seed in range(3):
        registry.register(make_checkpoint(tmp_path / f"c{seed}", seed=seed))
    prune(store, runs, registry, keep_runs=1, keep_versions=1)
    assert [p.name for p in runs.iterdir()] == [ids[2]] and len(registry.versions()) == 1

    def full_disk(keep: int) -> list[str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry, "prune", full_disk)
    prune(store, runs, registry, keep_runs=1, keep_versions=1)  # logged, not raised


def test_retention_verifies_the_versions_it_keeps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, runs, _ = jobs_with_runs(tmp_path, 1)
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(make_checkpoint(tmp_path / "c0")).version
    card = registry.versions_dir / version / "card.json"
    card.chmod(0o644)
    card.write_text(card.read_text().replace('"epochs": null', '"epochs": 99'))
    with caplog.at_level("ERROR", logger="app.control.retention"):
        prune(store, runs, registry, keep_runs=5, keep_versions=5)
    assert verify_kept(registry) == {version: ["card.json does not match its SHA-256 in SHA256SUMS"]}
    assert any(version in message and "damaged" in message for message in caplog.messages)
    assert registry.versions()[0].version == version  # kept: it may be current; the log says what to do
