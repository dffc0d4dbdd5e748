"""Every checkpoint under weights/ loads, says where and how it was made, and is as accurate as its card says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from app.config import SHIPPED_WEIGHTS
from model.card import CARD_FILE
from model.checkpoint import load_checkpoint
from training.augment import normalize
from training.data import load_split

SHIPPED = sorted(path.parent for path in SHIPPED_WEIGHTS.glob(f"*/{CARD_FILE}"))
SAMPLE = 600  # test images: the accuracy's standard error is about 1 point at 93 %


def test_at_least_one_checkpoint_ships():
    assert SHIPPED, f"no checkpoint under {SHIPPED_WEIGHTS}: the service would start without a model"


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda path: path.name)
def test_a_shipped_checkpoint_matches_its_card_and_names_its_provenance(directory: Path):
    checkpoint = load_checkpoint(directory)  # verifies the weights' SHA-256, architecture and parameter count
    card = checkpoint.card
    assert card.test_accuracy is not None and card.test_accuracy_tta is not None
    assert card.epochs == card.training["epochs"] and card.train_seconds and card.train_seconds > 0
    assert card.device and card.precision in ("bf16", "fp32") and card.torch_version
    assert card.data_provenance and card.git_commit and card.test_set_sha256
    assert card.training["holdout"] > 0, "tuned and calibrated on a holdout, never on the test set"


@pytest.mark.real_data
@pytest.mark.parametrize("directory", SHIPPED, ids=lambda path: path.name)
def test_a_shipped_checkpoint_classifies_real_test_images_at_its_cards_accuracy(directory: Path, real_cifar10):
    checkpoint = load_checkpoint(directory)
    test = load_split(real_cifar10, train=False, skip_integrity_check=True)
    # A spread-out sample (every k-th image), so that no class or stretch of the file dominates it.
    sample = test.take(0, None, len(test) // SAMPLE)
    with torch.inference_mode():
        predictions = torch.cat([checkpoint.model(normalize(batch)).argmax(1)
                                 for batch in sample.images.split(200)])
    accuracy = (predictions == sample.labels).float().mean().item()
    expected = checkpoint.card.test_accuracy
    standard_error = math.sqrt(expected * (1 - expected) / len(sample))
    assert abs(accuracy - expected) < 4 * standard_error, (accuracy, expected)


@pytest.mark.real_data
@pytest.mark.parametrize("directory", SHIPPED, ids=lambda path: path.name)
def test_a_shipped_cards_test_set_fingerprint_is_the_real_test_set(directory: Path, real_cifar10):
    """So that a run scored on the whole test set is compared with the shipped model by promotion's
    ``if-better``, rather than refused as scored on other images (app/control/promotion.py)."""
    from training.data import test_set_fingerprint

    card = load_checkpoint(directory).card
    assert card.test_set_sha256 == test_set_fingerprint(load_split(real_cifar10, train=False,
                                                                   skip_integrity_check=True))
