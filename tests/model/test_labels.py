"""model/labels.py checked against the data set itself, not restated: its label order and its statistics."""

import pickle

import numpy as np
import pytest

from model.labels import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES

# The two names model/labels.py shortens (for the page and the API's answers); the rest are the data set's.
SHORTENED = {"airplane": "plane", "automobile": "car"}


def unpickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


@pytest.mark.real_data
def test_class_names_follow_the_data_sets_label_order(real_cifar10):
    names = unpickle(real_cifar10 / "cifar-10-batches-py" / "batches.meta")["label_names"]
    assert tuple(SHORTENED.get(name, name) for name in names) == CLASS_NAMES


@pytest.mark.real_data
def test_normalisation_constants_are_the_training_sets_per_channel_statistics(real_cifar10):
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for number in range(1, 6):
        data = unpickle(real_cifar10 / "cifar-10-batches-py" / f"data_batch_{number}")["data"]
        pixels = data.reshape(-1, 3, 1024).astype(np.float32) / 255  # 1024 red, then green, then blue bytes
        total += pixels.sum(axis=(0, 2), dtype=np.float64)
        squares += np.square(pixels).sum(axis=(0, 2), dtype=np.float64)
        count += pixels.shape[0] * pixels.shape[2]
    mean = total / count
    std = np.sqrt(squares / count - mean ** 2)
    # The published figures; the rebuilt copy in ../shared/cifar10 (JPEG-degraded) is within 0.002 of them.
    assert np.allclose(mean, CIFAR10_MEAN, atol=0.005) and np.allclose(std, CIFAR10_STD, atol=0.005)
