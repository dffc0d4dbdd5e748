import json
import os
import shutil

import pytest
import torch

from model.architectures import build_model
from model.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    Calibration,
    CheckpointError,
    OutOfDistributionRule,
    file_sha256,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from model.features import STATISTICS_FILE
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


@pytest.mark.parametrize("content", ["{not json", json.dumps({"architecture": "resnet18"})])
def test_malformed_card_is_rejected_with_its_path(tmp_path, tiny_checkpoint, content):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / CARD_FILE).write_text(content)
    with pytest.raises(CheckpointError, match="card.json is not valid"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_card_says_what_a_checkpoint_is(tmp_path):
    with pytest.raises(CheckpointError, match="no model card"):
        load_checkpoint(tmp_path)


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    torch.save({"x": torch.zeros(1)}, weights)
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    card["weights_sha256"] = file_sha256(weights)
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt")


def _calibration() -> Calibration:
    rule = OutOfDistributionRule(score="energy", temperature=1.0, threshold=-2.5, target_tpr=0.95,
                                 holdout_tpr=0.95, test_tpr=0.948, selection="highest mean AUROC",
                                 candidates_auroc={"energy@T=1": {"uniform_noise": 0.99}})
    return Calibration(temperature=1.37, fitted_on="holdout: training images 45000-49999 (5000)",
                       holdout_images=5000, test_images=10000, test_ece_before=0.031, test_ece_after=0.007,
                       test_nll_before=0.41, test_nll_after=0.38, holdout_nll_before=0.42, holdout_nll_after=0.39,
                       ood=rule)


def test_the_calibration_field_round_trips_through_card_json(tmp_path):
    calibration = _calibration()
    save_checkpoint(build_model("resnet18"), tmp_path, architecture="resnet18", calibration=calibration)
    loaded = load_checkpoint(tmp_path).card.calibration
    assert loaded == calibration
    assert json.loads((tmp_path / CARD_FILE).read_text())["calibration"]["ood"]["score"] == "energy"


def test_a_card_written_before_calibration_existed_still_loads(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    del card["calibration"]
    assert card["format_version"] == 1
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    assert load_checkpoint(tmp_path / "ckpt").card.calibration is None


@pytest.mark.parametrize("change", [{"temperature": 0}, {"ood": {"score": "entropy"}}, {"extra": 1}])
def test_a_malformed_calibration_is_rejected(tmp_path, tiny_checkpoint, change):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    calibration = _calibration().model_dump(mode="json")
    for key, value in change.items():
        calibration[key] = {**calibration[key], **value} if isinstance(value, dict) else value
    card["calibration"] = calibration
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="card.json is not valid"):
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
