import json
import os
import shutil

import pytest
import torch

from model.architectures import build_model
from model.card import (
    CARD_FILE,
    STATISTICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    file_sha256,
    read_card,
)
from model.checkpoint import load_checkpoint, save_checkpoint
from model.labels import CLASS_NAMES
from tests.support.checkpoints import diverged_checkpoint, make_checkpoint, with_feature_rule
from tests.support.durability import record_fsyncs


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet18").eval()
    # Non-trivial running statistics, so the test would notice if buffers were not saved.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    save_checkpoint(model, tmp_path, architecture="resnet18", test_accuracy=0.5, epochs=3)
    loaded = load_checkpoint(tmp_path)
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(images), loaded.model(images))
    assert loaded.card.class_names == CLASS_NAMES
    assert loaded.card.weights_sha256 == file_sha256(tmp_path / WEIGHTS_FILE)
    assert loaded.card.version == f"resnet18-{loaded.card.weights_sha256[:12]}"
    assert not loaded.model.training


def test_loading_through_the_weights_file_path_finds_the_card_beside_it(tiny_checkpoint):
    assert load_checkpoint(tiny_checkpoint / WEIGHTS_FILE).card == read_card(tiny_checkpoint)


def test_half_precision_weights_load_into_a_float32_model(tmp_path):
    model = build_model("resnet18").eval()
    card = save_checkpoint(model, tmp_path, architecture="resnet18", dtype="float16")
    assert card.weights_dtype == "float16"
    loaded = load_checkpoint(tmp_path)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert (tmp_path / WEIGHTS_FILE).stat().st_size < 12_000_000 * 2 * 1.01


def test_weights_that_do_not_match_the_card_hash_are_rejected(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    other = make_checkpoint(tmp_path / "other", seed=5)
    shutil.copy(other / WEIGHTS_FILE, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "ckpt")


def test_card_naming_another_architecture_is_rejected(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    card["architecture"] = "resnet34"
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not fit a resnet34"):
        load_checkpoint(tmp_path / "ckpt")


def test_card_with_wrong_class_count_is_rejected(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    card["class_names"] = card["class_names"][:9]
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="9 classes"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    torch.save({"x": torch.zeros(1)}, weights)
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    card["weights_sha256"] = file_sha256(weights)
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt")


def test_weights_and_card_are_written_durably_and_readable_by_other_users(tmp_path, monkeypatch):
    log = record_fsyncs(monkeypatch)
    previous = os.umask(0o022)
    try:
        directory = make_checkpoint(tmp_path.resolve() / "checkpoint")
    finally:
        os.umask(previous)
    for name in (WEIGHTS_FILE, CARD_FILE):
        # safetensors' own save_file creates 0600, unreadable to a container's other UID.
        assert (directory / name).stat().st_mode & 0o777 == 0o644
        assert log.durably_replaced(directory / name)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_weights_holding_nan_are_refused_with_the_reason(tmp_path, dtype):
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor.*diverged"):
        load_checkpoint(diverged_checkpoint(tmp_path / "nan", dtype=dtype))


def _smooth_images(count: int, seed: int) -> torch.Tensor:
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 255
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round().to(torch.uint8)


def test_a_feature_rules_statistics_load_with_the_checkpoint_and_must_be_the_ones_it_was_fitted_with(tmp_path):
    source = make_checkpoint(tmp_path / "plain", architecture="resnet20")
    assert load_checkpoint(source).ood_statistics is None, "a logit rule (or none) needs no statistics"
    directory = with_feature_rule(source, tmp_path / "features", _smooth_images(64, 0))
    statistics = load_checkpoint(directory).ood_statistics
    assert statistics is not None and statistics.precision.shape == (16, 16)  # resnet20's first stage: 16 wide
    (directory / STATISTICS_FILE).write_bytes((directory / STATISTICS_FILE).read_bytes() + b" ")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(directory)
    (directory / STATISTICS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)
