import shutil
from pathlib import Path

import pytest

from app.control.registry import ModelRegistry, UnknownVersion
from model.checkpoint import CheckpointError, file_sha256, load_checkpoint, read_card
from tests.support.checkpoints import make_checkpoint


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
