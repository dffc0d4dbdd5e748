"""model/calibration_set.py: the int8 calibration images come back exactly, and only for their weights."""

import numpy as np
import pytest
import torch

from model.calibration_set import (
    CalibrationSetError,
    load_calibration_set,
    load_verification_set,
    save_calibration_set,
    save_verification_set,
)
from model.card import CALIBRATION_FILE, VERIFICATION_FILE

SHA = "c" * 64


def pixels(count: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def test_the_images_round_trip_exactly(tmp_path):
    saved = pixels()
    path = save_calibration_set(tmp_path, saved, weights_sha256=SHA, source="test images of nothing")
    assert path == tmp_path / CALIBRATION_FILE
    loaded = load_calibration_set(tmp_path, SHA)
    assert loaded.dtype == np.uint8 and loaded.shape == saved.shape
    assert np.array_equal(loaded, saved)


def test_a_torch_tensor_is_accepted_too(tmp_path):
    save_calibration_set(tmp_path, torch.from_numpy(pixels(3)), weights_sha256=SHA, source="tensor")
    assert np.array_equal(load_calibration_set(tmp_path, SHA), pixels(3))


def test_a_set_written_for_other_weights_is_refused(tmp_path):
    save_calibration_set(tmp_path, pixels(), weights_sha256=SHA, source="s")
    with pytest.raises(CalibrationSetError, match="written for weights c+, not for these"):
        load_calibration_set(tmp_path, "d" * 64)


def test_a_missing_set_says_how_to_write_one(tmp_path):
    with pytest.raises(CalibrationSetError, match="no calibration set.*training.verify_backends"):
        load_calibration_set(tmp_path, SHA)


def test_a_corrupt_file_is_refused(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CalibrationSetError, match="not a readable safetensors file"):
        load_calibration_set(tmp_path, SHA)


@pytest.mark.parametrize("bad", [pixels().astype(np.float32), pixels()[:, :, :, :1], pixels()[:0]])
def test_only_uint8_rgb_images_are_saved(tmp_path, bad):
    with pytest.raises(CalibrationSetError, match="uint8 images"):
        save_calibration_set(tmp_path, bad, weights_sha256=SHA, source="s")


def test_the_verification_set_round_trips_with_its_labels_and_only_for_its_weights(tmp_path):
    saved, labels = pixels(), np.arange(12) % 10
    path = save_verification_set(tmp_path, saved, labels, weights_sha256=SHA, source="holdout of nothing")
    assert path == tmp_path / VERIFICATION_FILE
    loaded, loaded_labels = load_verification_set(tmp_path, SHA)
    assert np.array_equal(loaded, saved) and np.array_equal(loaded_labels, labels)
    assert loaded_labels.dtype == np.int64
    with pytest.raises(CalibrationSetError, match="was written for weights"):
        load_verification_set(tmp_path, "d" * 64)
    with pytest.raises(CalibrationSetError, match="no verification set at .*training.verify_backends"):
        load_verification_set(tmp_path / "absent", SHA)


def test_a_verification_set_needs_one_label_per_image_and_the_calibration_file_is_not_one(tmp_path):
    with pytest.raises(CalibrationSetError, match="one label per image"):
        save_verification_set(tmp_path, pixels(), np.zeros(5), weights_sha256=SHA, source="test")
    save_calibration_set(tmp_path, pixels(), weights_sha256=SHA, source="test")
    (tmp_path / CALIBRATION_FILE).rename(tmp_path / VERIFICATION_FILE)
    with pytest.raises(CalibrationSetError, match="holds no 'labels' tensor"):
        load_verification_set(tmp_path, SHA)
