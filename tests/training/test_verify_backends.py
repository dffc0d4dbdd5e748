"""training/verify_backends.py on the synthetic CIFAR-10: the command and the end of a training run write a
backend report bound to the weights, and the training images int8 was calibrated on."""

import numpy as np
import pytest
import torch

import training.run
from model.backend_report import (
    BackendReportError,
    load_backend_report,
    machine_identity,
    read_backend_report,
    report_file,
)
from model.calibration_set import load_calibration_set, load_verification_set
from model.card import CARD_FILE, file_sha256, read_card, write_card
from model.inference import available_cpu_backends
from tests.support.checkpoints import make_checkpoint
from tests.support.cifar10 import synthetic_images
from tests.training.conftest import TINY_RUN
from training.__main__ import main as train
from training.metrics import read_metrics
from training.verify_backends import VerificationSettings, main

# A few milliseconds per timing: these tests check what is written, not how fast anything is.
QUICK = ["--seconds", "0.02", "--rounds", "1", "--batch-sizes", "1", "4", "--passes", "2"]
EXACT = 1e-5  # fused and onnx against float32: rounding only


@pytest.fixture(scope="module")
def verified(synthetic_cifar10, tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("verified"), seed=3, architecture="resnet20")
    assert main(["--weights", str(checkpoint), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                 "--device", "cpu", "--calibration-images", "30", *QUICK]) == 0
    return checkpoint


def test_the_command_measures_every_available_backend_on_the_whole_test_set(verified):
    card = read_card(verified)
    report = load_backend_report(verified, weights_sha256=card.weights_sha256, machine=machine_identity("cpu"))
    available, missing = available_cpu_backends()
    assert [row.backend for row in report.backends] == list(available)
    assert report.skipped == missing
    assert report.reference == "eager" and report.test_images == 50, "the synthetic test batch holds 50"
    assert report.architecture == "resnet20"
    reference = report.reference_measurement
    assert reference.agreement == 1 and reference.max_probability_diff == 0
    for name in ("fused", "onnx"):
        if (row := report.measurement(name)) is not None:
            assert row.accuracy == reference.accuracy and row.agreement == 1, name
            assert row.max_probability_diff < EXACT, name
    for row in report.backends:
        assert set(row.images_per_s) == {1, 4} and all(speed > 0 for speed in row.images_per_s.values())
        assert row.startup_s >= 0


def test_int8_is_calibrated_on_the_first_training_images_and_the_report_names_them(verified):
    card = read_card(verified)
    calibration = load_calibration_set(verified, card.weights_sha256)
    first_batch, _ = synthetic_images(20, seed=0)  # data_batch_1 of the synthetic set
    second_batch, _ = synthetic_images(20, seed=1)
    assert calibration.shape == (30, 32, 32, 3) and calibration.dtype == np.uint8
    assert np.array_equal(calibration, np.concatenate([first_batch, second_batch])[:30])
    report = read_backend_report(verified / report_file("cpu"))
    assert report.calibration_images == 30
    assert report.calibration_sha256 == file_sha256(verified / "calibration.safetensors")


def test_the_report_is_refused_once_the_weights_change(verified, tmp_path):
    for name in ("card.json", "model.safetensors", report_file("cpu")):
        (tmp_path / name).write_bytes((verified / name).read_bytes())
    make_checkpoint(tmp_path, seed=4, architecture="resnet20")  # new weights and card, the old report
    card = read_card(tmp_path)
    with pytest.raises(BackendReportError, match="stale"):
        load_backend_report(tmp_path, weights_sha256=card.weights_sha256, machine=machine_identity("cpu"))


def test_a_missing_checkpoint_or_dataset_is_one_error_line(synthetic_cifar10, tmp_path, capsys):
    assert main(["--weights", str(tmp_path), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                 "--device", "cpu", *QUICK]) == 1
    assert capsys.readouterr().err.startswith("error: no model card")
    checkpoint = make_checkpoint(tmp_path / "checkpoint", architecture="resnet20")
    assert main(["--weights", str(checkpoint), "--data-dir", str(tmp_path), "--device", "cpu", *QUICK]) == 1
    assert "no CIFAR-10" in capsys.readouterr().err


def test_usage_errors_exit_2_naming_this_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--weights", "w", "--data-dir", "d", "--seconds", "0"])
    assert stop.value.code == 2
    assert "python -m training.verify_backends --help" in capsys.readouterr().err


@pytest.fixture
def quick_verification(monkeypatch):
    monkeypatch.setattr(training.run, "VERIFICATION", VerificationSettings(
        batch_sizes=(1, 4), seconds=0.02, rounds=1, passes=2, calibration_images=16))


def run_without_test_limit(data_dir, run_dir, *extra: str) -> list[str]:
    limit = TINY_RUN.index("--test-limit")
    return ["--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY_RUN[:limit], *TINY_RUN[limit + 2:],
            "--arch", "resnet20", "--no-plots", *extra]


def test_a_training_run_ends_by_verifying_its_checkpoint(synthetic_cifar10, tmp_path, quick_verification):
    run_dir = tmp_path / "run"
    assert train(run_without_test_limit(synthetic_cifar10, run_dir)) == 0
    checkpoint = run_dir / "checkpoint"
    card = read_card(checkpoint)
    report = load_backend_report(checkpoint, weights_sha256=card.weights_sha256, machine=machine_identity("cpu"))
    assert report.test_images == 50
    assert report.reference_measurement.accuracy == pytest.approx(card.test_accuracy, abs=1e-6), \
        "float32 on the CPU is what the run itself evaluated"
    assert len(load_calibration_set(checkpoint, card.weights_sha256)) == 16
    records = read_metrics(run_dir / "metrics.jsonl")
    backends = next(record for record in records if record["event"] == "backends")
    assert set(backends["backends"]) == {row.backend for row in report.backends}
    assert records[-1]["event"] == "final"


def test_a_run_with_a_holdout_ships_it_as_the_verification_set(synthetic_cifar10, tmp_path, quick_verification):
    """What the service measures backends on, on a machine other than the training one (issue 23)."""
    from model.calibration_set import load_verification_set

    run_dir = tmp_path / "run"
    assert train(run_without_test_limit(synthetic_cifar10, run_dir, "--holdout", "12")) == 0
    checkpoint = run_dir / "checkpoint"
    pixels, labels = load_verification_set(checkpoint, read_card(checkpoint).weights_sha256)
    assert pixels.shape == (12, 32, 32, 3) and labels.shape == (12,)


def test_verification_is_skipped_with_a_test_limit_or_when_turned_off(synthetic_cifar10, tmp_path,
                                                                      quick_verification):
    limited = tmp_path / "limited"
    assert train(run_without_test_limit(synthetic_cifar10, limited, "--test-limit", "20")) == 0
    off = tmp_path / "off"
    assert train(run_without_test_limit(synthetic_cifar10, off, "--no-verify-backends")) == 0
    for run_dir in (limited, off):
        assert not (run_dir / "checkpoint" / report_file("cpu")).exists()
        assert not (run_dir / "checkpoint" / "calibration.safetensors").exists()
        assert all(record["event"] != "backends" for record in read_metrics(run_dir / "metrics.jsonl"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_float32_is_compared_with_bf16_autocast(synthetic_cifar10, tmp_path):
    checkpoint = make_checkpoint(tmp_path, architecture="resnet20")
    assert main(["--weights", str(checkpoint), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                 "--device", "cuda", *QUICK]) == 0
    card = read_card(checkpoint)
    report = load_backend_report(checkpoint, weights_sha256=card.weights_sha256,
                                 machine=machine_identity("cuda"))
    assert [row.backend for row in report.backends] == ["fp32", "bf16"] and report.reference == "fp32"
    assert report.measurement("bf16").agreement >= 0.9


def test_the_holdout_the_card_names_is_saved_as_the_verification_set_and_logits_are_compared(synthetic_cifar10,
                                                                                           tmp_path):
    """The service measures its backends on these images (app.engine.self_verification): the last `holdout`
    training images, with their labels, exactly as training held them out."""
    from training.data import load_split

    checkpoint = make_checkpoint(tmp_path / "checkpoint", seed=4, architecture="resnet20")
    card = read_card(checkpoint)
    write_card(card.model_copy(update={"training": {**card.training, "holdout": 10}}), checkpoint / CARD_FILE)
    assert main(["--weights", str(checkpoint), "--data-dir", str(synthetic_cifar10), "--skip-integrity-check",
                 "--device", "cpu", "--calibration-images", "30", *QUICK]) == 0
    pixels, labels = load_verification_set(checkpoint, card.weights_sha256)
    train = load_split(synthetic_cifar10, train=True, skip_integrity_check=True)
    assert np.array_equal(pixels, train.images[-10:].permute(0, 2, 3, 1).numpy())
    assert np.array_equal(labels, train.labels[-10:].numpy())
    report = load_backend_report(checkpoint, weights_sha256=card.weights_sha256, machine=machine_identity("cpu"))
    assert report.image_set == "test"
    assert report.reference_measurement.max_logit_diff == 0
    for row in report.backends:
        assert row.max_logit_diff is not None and row.max_logit_diff >= 0
        if row.backend in ("fused", "onnx"):
            assert row.max_logit_diff < 1e-3, row.backend
