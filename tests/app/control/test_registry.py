import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from app.control.registry import STALE_LEFTOVER_S, ModelRegistry, RegistryError, UnknownVersion
from model.backend_report import (
    BackendMeasurement,
    BackendReport,
    load_backend_report,
    machine_identity,
    write_backend_report,
)
from model.calibration_set import save_calibration_set, save_verification_set
from model.card import CALIBRATION_FILE, VERIFICATION_FILE, CheckpointError, file_sha256, read_card
from model.checkpoint import load_checkpoint
from tests.support.checkpoints import diverged_checkpoint, make_checkpoint
from tests.support.durability import record_fsyncs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return [make_checkpoint(root / f"c{seed}", seed=seed) for seed in (0, 1)]


def test_register_makes_an_immutable_verifiable_version(tmp_path: Path, checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    registered = registry.register(checkpoints[0], source_job="job1")
    card = read_card(checkpoints[0])
    assert registered.version == card.version and registered.source_job == "job1"
    directory = registry.path(card.version)
    sums = dict(reversed(line.split("  ")) for line in (directory / "SHA256SUMS").read_text().splitlines())
    assert sums == {name: file_sha256(directory / name) for name in ("model.safetensors", "card.json")}
    assert not (directory / "model.safetensors").stat().st_mode & 0o222
    assert load_checkpoint(directory).card == card
    # The same weights again are the same version, not a duplicate.
    assert registry.register(checkpoints[0]).registered_at == registered.registered_at
    assert [m.version for m in registry.versions()] == [card.version]


def test_current_pointer_moves_between_versions(tmp_path: Path, checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.current() is None
    first, second = (registry.register(c).version for c in checkpoints)
    registry.set_current(first)
    assert ModelRegistry(tmp_path / "registry").current() == first
    registry.set_current(second)
    assert registry.current() == second
    assert [m.version for m in registry.versions()] == [second, first]
    assert not list((tmp_path / "registry").glob("*.tmp"))


def test_unknown_and_malformed_versions_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    for version in ("resnet18-000000000000", "../registry", ""):
        with pytest.raises(UnknownVersion):
            registry.set_current(version)
    assert registry.current() is None


def test_a_checkpoint_whose_weights_do_not_match_its_card_is_refused(tmp_path: Path,
                                                                    checkpoints: list[Path]) -> None:
    torn = shutil.copytree(checkpoints[0], tmp_path / "torn")
    shutil.copyfile(checkpoints[1] / "model.safetensors", torn / "model.safetensors")
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match="SHA-256"):
        registry.register(torn)
    assert registry.versions() == []


def test_versions_and_the_pointer_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch,
                                                                                    checkpoints):
    log = record_fsyncs(monkeypatch)
    registry = ModelRegistry(tmp_path.resolve() / "registry")
    version = registry.register(checkpoints[0]).version
    registry.set_current(version)
    assert log.durably_replaced(registry.versions_dir / version)
    assert {"model.safetensors", "card.json"} <= {path.name for path in log.synced()}
    assert log.durably_replaced(registry.root / "current")


def test_set_current_remembers_the_previous_version(tmp_path, checkpoints):
    registry = ModelRegistry(tmp_path / "registry")
    first, second = (registry.register(c).version for c in checkpoints)
    registry.set_current(first)
    assert registry.previous() is None
    registry.set_current(second)
    registry.set_current(second)  # promoting the current one again must not lose the fallback
    assert (registry.current(), registry.previous()) == (second, first)


def test_prune_keeps_the_newest_and_never_the_current_or_previous(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    versions = [registry.register(make_checkpoint(tmp_path / f"c{seed}", seed=seed)).version for seed in range(5)]
    registry.set_current(versions[0])
    registry.set_current(versions[1])
    assert registry.prune(keep=0) == []
    deleted = registry.prune(keep=2)  # the two newest: versions[4], versions[3]
    assert sorted(deleted) == [versions[2]]
    assert {m.version for m in registry.versions()} == {versions[0], versions[1], versions[3], versions[4]}
    assert not any(p.name.startswith(".") for p in registry.versions_dir.iterdir())


def with_companions(checkpoint: Path, directory: Path) -> Path:
    """A copy of ``checkpoint`` with a backend report and an int8 calibration set beside its weights."""
    copy = shutil.copytree(checkpoint, directory)
    sha = read_card(copy).weights_sha256
    write_backend_report(BackendReport(
        weights_sha256=sha, architecture="resnet18", machine=machine_identity("cpu"), reference="eager",
        test_images=10_000, backends=(BackendMeasurement(
            backend="eager", accuracy=0.5, agreement=1.0, max_probability_diff=0.0,
            images_per_s={1: 1.0, 16: 2.0, 64: 2.0}, startup_s=0.1, first_calls_s=0.1),)), copy)
    save_calibration_set(copy, np.zeros((4, 32, 32, 3), dtype=np.uint8), weights_sha256=sha, source="test")
    save_verification_set(copy, np.zeros((4, 32, 32, 3), dtype=np.uint8), np.arange(4), weights_sha256=sha,
                          source="test")
    return copy


def test_a_version_keeps_the_backend_report_and_calibration_set_measured_on_its_weights(tmp_path, checkpoints):
    source = with_companions(checkpoints[0], tmp_path / "verified")
    registry = ModelRegistry(tmp_path / "registry")
    directory = Path(registry.register(source).path)
    for name in ("backends-cpu.json", CALIBRATION_FILE, VERIFICATION_FILE):
        assert (directory / name).read_bytes() == (source / name).read_bytes()
        assert not (directory / name).stat().st_mode & 0o222
    assert load_backend_report(directory, weights_sha256=read_card(source).weights_sha256,
                               machine=machine_identity("cpu")).reference == "eager"
    assert not (directory / "backends-cuda.json").exists()  # only what the source has


def test_a_version_registered_before_verification_gains_the_reports_later_but_never_loses_its_own(
        tmp_path, checkpoints):
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(checkpoints[0]).version  # no report yet
    directory = registry.path(version)
    assert not (directory / "backends-cpu.json").exists()
    verified = with_companions(checkpoints[0], tmp_path / "verified")
    assert registry.register(verified).version == version
    report = (directory / "backends-cpu.json").read_bytes()
    assert report == (verified / "backends-cpu.json").read_bytes()
    (verified / "backends-cpu.json").write_text("{}")  # a later, different file does not replace it
    registry.register(verified)
    assert (directory / "backends-cpu.json").read_bytes() == report


def test_a_checkpoint_with_nan_weights_is_never_registered(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match="NaN or infinite.*diverged"):
        registry.register(diverged_checkpoint(tmp_path / "nan"))
    assert registry.versions() == [] and list((tmp_path / "registry" / "versions").iterdir()) == []


def test_odd_entries_in_the_versions_folder_hide_no_version(tmp_path: Path, checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    good = registry.register(checkpoints[0]).version
    damaged = registry.register(checkpoints[1]).version
    (registry.versions_dir / "README.txt").write_text("a stray file\n")
    (registry.versions_dir / "resnet18-cardless").mkdir()
    (registry.versions_dir / "resnet18-cardless" / "registration.json").write_text("{}")
    registration = registry.versions_dir / damaged / "registration.json"
    registration.chmod(0o644)
    registration.write_text("{not json")
    assert [model.version for model in registry.versions()] == [good]
    with pytest.raises(RegistryError, match=f"registry version {damaged} .* is damaged"):
        registry.get(damaged)
    with pytest.raises(UnknownVersion):
        registry.get("resnet18-cardless")


def test_a_pointer_that_is_no_version_name_is_a_clear_error(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    (tmp_path / "registry" / "current").write_bytes(b"\xff\xfe")
    with pytest.raises(RegistryError, match="is not text"):
        registry.current()
    (tmp_path / "registry" / "current").write_text("../../etc/passwd\n")
    with pytest.raises(RegistryError, match="does not hold a version name"):
        registry.current()


def test_retention_spares_what_replicas_serve_until_they_stop_saying_so(tmp_path: Path,
                                                                       checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    old = registry.register(checkpoints[0]).version
    other = registry.register(make_checkpoint(tmp_path / "c2", seed=2)).version
    newest = registry.register(make_checkpoint(tmp_path / "c3", seed=3)).version
    registry.record_serving("replica-a", old)  # a replica that has not followed the pointer yet
    registry.record_serving("replica-b", newest)
    assert registry.serving_versions() == {old, newest}
    assert registry.prune(keep=1) == [other]
    assert {m.version for m in registry.versions()} == {old, newest}
    # A replica that stopped refreshing its record is forgotten, and so is what it served.
    assert registry.prune(keep=1, serving_max_age_s=0) == [old]
    assert registry.serving_versions() == set()
    with pytest.raises(ValueError):
        registry.record_serving("../escape", newest)


def test_retention_clears_leftovers_of_interrupted_registrations(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    stale, fresh = registry.versions_dir / ".staging-dead", registry.versions_dir / ".staging-live"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        (folder / "model.safetensors").chmod(0o444)
    long_ago = time.time() - 2 * STALE_LEFTOVER_S
    os.utime(stale, (long_ago, long_ago))
    registry.prune(keep=5)
    assert not stale.exists() and fresh.exists()  # a live registration is left to finish


def test_a_damaged_version_is_found_and_registering_its_weights_again_repairs_it(tmp_path: Path,
                                                                                checkpoints: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(checkpoints[0]).version
    assert registry.verify(version) == []
    weights = registry.versions_dir / version / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as handle:  # a flipped byte: bit rot, a bad copy
        handle.seek(100)
        handle.write(bytes([handle.read(1)[0] ^ 0xFF]))
    assert registry.verify(version) == ["model.safetensors does not match its SHA-256 in SHA256SUMS"]
    registry.register(checkpoints[0])
    assert registry.verify(version) == [] and load_checkpoint(registry.path(version)).card.version == version
