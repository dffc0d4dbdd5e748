"""The end-of-run calibration and `python -m training.calibrate` on an existing checkpoint, on synthetic data."""

import json
import shutil

import pytest

from model.card import CARD_FILE, WEIGHTS_FILE, file_sha256, read_card
from model.checkpoint import load_checkpoint
from tests.training.conftest import tiny_run_args
from training.__main__ import main as train
from training.calibrate import main as calibrate
from training.metrics import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def calibrated_run(synthetic_cifar10, tmp_path_factory):
    """One epoch of fastcnn (a fifth of ResNet-18's FLOPs) with a 20-image holdout (training images 44-63): the
    run ends by calibrating."""
    run_dir = tmp_path_factory.mktemp("calibrated") / "run"
    args = tiny_run_args(synthetic_cifar10, run_dir, "--epochs", "1", "--holdout", "20", "--arch", "fastcnn")
    assert train(args) == 0
    return run_dir


def test_a_run_with_a_holdout_calibrates_its_checkpoint(calibrated_run):
    card = load_checkpoint(calibrated_run / "checkpoint").card
    calibration = card.calibration
    assert calibration is not None
    assert calibration.fitted_on.startswith("holdout: training images 44-63 (20)")
    assert (calibration.holdout_images, calibration.test_images, calibration.ece_bins) == (20, 20, 15)
    assert calibration.holdout_nll_after <= calibration.holdout_nll_before, "the fit minimises the holdout NLL"
    assert 0 <= calibration.test_ece_after <= 1 and calibration.test_nll_after > 0
    assert calibration.ood.score in ("energy", "msp") and calibration.ood.holdout_tpr >= 0.95
    final = read_metrics(calibrated_run / "metrics.jsonl")[-1]
    assert final["calibration"]["temperature"] == calibration.temperature
    assert final["calibration"]["test_ece_after"] == calibration.test_ece_after
    assert final["calibration"]["ood_threshold"] == calibration.ood.threshold
    assert (calibrated_run / "reliability.png").read_bytes()[:8] == PNG


def test_a_run_without_a_holdout_skips_calibration_and_says_so(trained_run):
    assert read_card(trained_run / "checkpoint").calibration is None
    assert read_metrics(trained_run / "metrics.jsonl")[-1]["calibration"] is None
    assert not (trained_run / "reliability.png").exists()


def test_calibrating_afterwards_refits_the_same_holdout_and_leaves_the_weights(calibrated_run, synthetic_cifar10,
                                                                                tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(calibrated_run / "checkpoint", checkpoint)
    at_the_end = read_card(checkpoint)
    # As a card written before calibration existed.
    stored = json.loads((checkpoint / CARD_FILE).read_text())
    del stored["calibration"]
    (checkpoint / CARD_FILE).write_text(json.dumps(stored))
    weights_before = (checkpoint / WEIGHTS_FILE).read_bytes()

    out = tmp_path / "out"
    assert calibrate(["--weights", str(checkpoint), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                      "--device", "cpu", "--test-limit", "20", "--out-dir", str(out)]) == 0
    assert "temperature" in capsys.readouterr().out

    assert (checkpoint / WEIGHTS_FILE).read_bytes() == weights_before
    card = load_checkpoint(checkpoint).card  # still verifies against the weights
    assert card.weights_sha256 == at_the_end.weights_sha256 == file_sha256(checkpoint / WEIGHTS_FILE)
    assert card.model_dump(exclude={"calibration"}) == at_the_end.model_dump(exclude={"calibration"})
    # The same images (the card's train_limit and holdout), the same model: the same fit as the run's own.
    ours, theirs = card.calibration, at_the_end.calibration
    assert ours.temperature == pytest.approx(theirs.temperature, rel=1e-9)
    assert ours.ood.threshold == pytest.approx(theirs.ood.threshold, rel=1e-6)
    assert (ours.fitted_on, ours.test_ece_after, ours.ood.score) == (theirs.fitted_on, theirs.test_ece_after,
                                                                      theirs.ood.score)
    assert (out / "reliability.png").read_bytes()[:8] == PNG
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["event"] == "calibration" and record["model_version"] == card.version
    assert not list(checkpoint.glob("*.tmp")), "the card is replaced by a rename, leaving nothing behind"


def test_calibrating_a_checkpoint_without_a_holdout_is_one_error_line(trained_run, synthetic_cifar10, tmp_path,
                                                                       capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained_run / "checkpoint", checkpoint)
    card_before = (checkpoint / CARD_FILE).read_bytes()
    assert calibrate(["--weights", str(checkpoint), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                      "--device", "cpu"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "no holdout" in line and "--holdout N" in line
    assert (checkpoint / CARD_FILE).read_bytes() == card_before


def test_a_holdout_from_the_first_images_is_the_one_calibrated_on_then_and_afterwards(synthetic_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run_args(synthetic_cifar10, run_dir, "--epochs", "1", "--holdout", "20", "--holdout-from", "first",
                         "--arch", "fastcnn")
    assert train(args) == 0
    at_the_end = read_card(run_dir / "checkpoint")
    assert at_the_end.training["holdout_from"] == "first"
    assert at_the_end.calibration.fitted_on.startswith("holdout: training images 0-19 (20)")
    assert calibrate(["--weights", str(run_dir / "checkpoint"), "--data-dir", str(synthetic_cifar10),
                      "--skip-integrity-check", "--device", "cpu", "--test-limit", "20"]) == 0
    again = read_card(run_dir / "checkpoint").calibration
    assert again.fitted_on == at_the_end.calibration.fitted_on
    assert again.temperature == pytest.approx(at_the_end.calibration.temperature, rel=1e-9)
