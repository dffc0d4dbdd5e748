"""Checkpoints for tests: random-init networks saved in the real format (tests need real weights files, not
trained ones)."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from model.architectures import build_model
from model.card import CARD_FILE, Calibration, OutOfDistributionRule, read_card, write_card
from model.checkpoint import save_checkpoint
from tests.support.cifar10 import write_cifar10
from training.data import load_split, test_set_fingerprint


def make_checkpoint(directory: Path, seed: int = 0, architecture: str = "resnet18",
                    test_accuracy: float | None = None, test_set_sha256: str | None = "synthetic") -> Path:
    """A random-init checkpoint; its card claims ``test_accuracy`` (to steer the if-better promotion
    policy), by default 0.1 + seed / 100, measured on the test set ``test_set_sha256`` names: by default the
    synthetic one (``synthetic_cifar10``'s, which the tests' training runs are scored on), None for a card from
    before test-set fingerprints."""
    torch.manual_seed(seed)
    model = build_model(architecture)
    accuracy = 0.1 + seed / 100 if test_accuracy is None else test_accuracy
    fingerprint = synthetic_test_set_sha256() if test_set_sha256 == "synthetic" else test_set_sha256
    save_checkpoint(model, directory, architecture=architecture, test_accuracy=accuracy,
                    test_set_sha256=fingerprint)
    return directory


@functools.cache
def synthetic_test_set_sha256() -> str:
    """The test-set fingerprint a training run on the ``synthetic_cifar10`` data records (no test_limit)."""
    with tempfile.TemporaryDirectory() as folder:
        root = write_cifar10(Path(folder))
        return test_set_fingerprint(load_split(root, train=False, skip_integrity_check=True))


def with_input_size(checkpoint: Path, directory: Path, input_size: int) -> Path:
    """A copy of ``checkpoint`` whose card says it takes ``input_size`` pixels (the CIFAR networks pool
    adaptively, so they run at any size)."""
    shutil.copytree(checkpoint, directory)
    card = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps(card | {"input_size": input_size}))
    return directory


def with_calibration(checkpoint: Path, directory: Path, temperature: float = 2.0, threshold: float = 0.0,
                     upper_threshold: float | None = None) -> Path:
    """A copy of ``checkpoint`` whose card carries a calibration: ``temperature`` and an energy@T=1 OOD rule
    with ``threshold`` (the card is not covered by the weights' SHA-256, so the copy still verifies)."""
    shutil.copytree(checkpoint, directory)
    rule = OutOfDistributionRule(score="energy", temperature=1.0, threshold=threshold,
                                 upper_threshold=upper_threshold, target_tpr=0.95, holdout_tpr=0.95,
                                 test_tpr=0.96, selection="set by the test")
    calibration = Calibration(temperature=temperature, fitted_on="a test's made-up holdout", holdout_images=10,
                              test_images=10, test_ece_before=0.2, test_ece_after=0.01, test_nll_before=0.5,
                              test_nll_after=0.3, holdout_nll_before=0.5, holdout_nll_after=0.3, ood=rule)
    card = read_card(directory).model_copy(update={"calibration": calibration})
    write_card(card, directory / CARD_FILE)
    return directory


def diverged_checkpoint(directory: Path, architecture: str = "resnet18", dtype: str = "float32") -> Path:
    """A checkpoint as a diverged run would write it: a valid card over weights holding NaN."""
    model = build_model(architecture)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_checkpoint(model, directory, architecture=architecture, dtype=dtype, test_accuracy=0.1)
    return directory


def with_feature_rule(checkpoint: Path, directory: Path, in_distribution: torch.Tensor) -> Path:
    """A copy of ``checkpoint`` whose card carries a feature OOD rule (stage 1, log, plus energy) fitted on
    ``in_distribution`` (uint8 N x 3 x H x W), its threshold keeping 95 % of them, and its statistics file."""
    from model.checkpoint import load_checkpoint
    from training.ood import threshold_at_tpr
    from training.ood_features import CANDIDATES, fit_candidate, outputs_of

    shutil.copytree(checkpoint, directory)
    model = load_checkpoint(directory).model
    outputs = outputs_of(model, in_distribution, torch.device("cpu"), contextlib.nullcontext)
    fitted = fit_candidate(CANDIDATES[2], outputs, model.fc.in_features, "a test's images")
    threshold = threshold_at_tpr(fitted.scores(outputs))
    (directory / fitted.rule.statistics_file).write_bytes(fitted.statistics_bytes)
    rule = OutOfDistributionRule(score="features", temperature=1.0, threshold=threshold, target_tpr=0.95,
                                 holdout_tpr=0.95, selection="set by the test", features=fitted.rule)
    calibration = Calibration(temperature=1.5, fitted_on="a test's made-up holdout", holdout_images=10,
                              test_images=10, holdout_nll_before=0.5, holdout_nll_after=0.3, ood=rule)
    write_card(read_card(directory).model_copy(update={"calibration": calibration}), directory / CARD_FILE)
    return directory
