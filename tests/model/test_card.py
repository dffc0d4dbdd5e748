import json
import shutil
import subprocess
import sys

import pytest
import torch

from model.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    Calibration,
    CheckpointError,
    ModelCard,
    OutOfDistributionRule,
    check_finite_weights,
    read_card,
    write_card,
)
from tests.support import REPO_ROOT
from tests.support.checkpoints import diverged_checkpoint


def test_reading_a_card_imports_no_torch():
    """The control plane registers and promotes checkpoints with this module alone, and must start without torch
    (tests/app/control/test_service.py)."""
    script = ("import sys; from model.card import read_card; read_card('weights/fastcnn'); "
              "print('torch' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert imported == "False"


def test_a_new_card_names_the_torch_that_wrote_it():
    card = ModelCard(architecture="resnet18", weights_sha256="0" * 64, parameter_count=1)
    assert card.torch_version == torch.__version__


@pytest.mark.parametrize("content", ["{not json", json.dumps({"architecture": "resnet18"})])
def test_malformed_card_is_rejected_with_its_path(tmp_path, tiny_checkpoint, content):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / CARD_FILE).write_text(content)
    with pytest.raises(CheckpointError, match="card.json is not valid"):
        read_card(tmp_path / "ckpt")


def test_missing_card_says_what_a_checkpoint_is(tmp_path):
    with pytest.raises(CheckpointError, match="no model card"):
        read_card(tmp_path)


def _calibration() -> Calibration:
    rule = OutOfDistributionRule(score="energy", temperature=1.0, threshold=-2.5, target_tpr=0.95,
                                 holdout_tpr=0.95, test_tpr=0.948, selection="highest mean AUROC",
                                 candidates_auroc={"energy@T=1": {"uniform_noise": 0.99}})
    return Calibration(temperature=1.37, fitted_on="holdout: training images 45000-49999 (5000)",
                       holdout_images=5000, test_images=10000, test_ece_before=0.031, test_ece_after=0.007,
                       test_nll_before=0.41, test_nll_after=0.38, holdout_nll_before=0.42, holdout_nll_after=0.39,
                       ood=rule)


def test_the_calibration_field_round_trips_through_card_json(tmp_path, tiny_checkpoint):
    calibration = _calibration()
    write_card(read_card(tiny_checkpoint).model_copy(update={"calibration": calibration}), tmp_path / CARD_FILE)
    assert read_card(tmp_path).calibration == calibration
    assert json.loads((tmp_path / CARD_FILE).read_text())["calibration"]["ood"]["score"] == "energy"


def test_a_card_written_before_calibration_existed_still_loads(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    card = json.loads((tmp_path / "ckpt" / CARD_FILE).read_text())
    del card["calibration"]
    assert card["format_version"] == 1
    (tmp_path / "ckpt" / CARD_FILE).write_text(json.dumps(card))
    assert read_card(tmp_path / "ckpt").calibration is None


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
        read_card(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_weights_holding_nan_fail_the_finite_check_in_every_dtype(tmp_path, dtype):
    checkpoint = diverged_checkpoint(tmp_path / "nan", architecture="fastcnn", dtype=dtype)
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor.*diverged"):
        check_finite_weights(checkpoint / WEIGHTS_FILE)
    check_finite_weights(REPO_ROOT / "weights" / "fastcnn" / WEIGHTS_FILE)  # the shipped weights are finite


def test_the_finite_check_of_float_weights_imports_no_torch(tmp_path):
    """The control plane checks every finished run's weights before registering them: for float32 and float16
    weights that must not load torch into it."""
    weights = diverged_checkpoint(tmp_path / "nan", architecture="fastcnn", dtype="float16") / WEIGHTS_FILE
    script = ("import sys\nfrom model.card import CheckpointError, check_finite_weights\n"
              f"try:\n    check_finite_weights({str(weights)!r})\nexcept CheckpointError as error:\n"
              "    print('refused' if 'diverged' in str(error) else error)\nprint('torch' in sys.modules)")
    printed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == ["refused", "False"]


def test_a_file_that_is_not_safetensors_is_refused_by_the_finite_check(tmp_path):
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        check_finite_weights(weights)
