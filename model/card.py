"""The model card and the checkpoint directory's layout: what a process that loads no model needs of a checkpoint.

A checkpoint is a directory holding the weights (``WEIGHTS_FILE``, safetensors) and their model card
(``CARD_FILE``, JSON validated by ``ModelCard``), and optionally the files measured on those weights that a
service reads beside them. This module holds the card's schema, reading and writing ``card.json``, the
weights' SHA-256 and the files' names, and imports no torch: the control plane (``python -m app.control``)
registers, verifies and promotes checkpoints with it alone, and its supervisor restarts it on the cores that
serve ``/predict``, where importing torch cost seconds of CPU (``benchmarks/control_start.py``).
``model/checkpoint.py`` builds on it to save, load and verify the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open

from model.durable import write_atomically
from model.labels import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, INPUT_SIZE

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
# Optional, each measured on the weights it lies beside (and bound to them by their SHA-256):
STATISTICS_FILE = "ood_features.safetensors"  # the OOD feature rule's mean and precision (model.features)
CALIBRATION_FILE = "calibration.safetensors"  # int8's calibration images (model.calibration_set)
VERIFICATION_FILE = "verification.safetensors"  # the labelled verification set (model.calibration_set)
# (and the backend reports, backends-<device>.json: model.backend_report.report_file)

# Which part of the network's features, after which transform, a feature OOD score reads (model.features).
FeaturePart = Literal["stage1", "penultimate"]
Transform = Literal["log", "l2", "none"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is; the message says what is wrong and what to do."""


class FeatureScore(BaseModel):
    """A score of the network's features (``model.features``), optionally plus the energy of its logits:
    ``(mahalanobis - feature_centre) / feature_scale + energy_weight * (energy - energy_centre) / energy_scale``,
    with ``mahalanobis`` minus the squared Mahalanobis distance of the transformed ``part`` to the statistics
    in ``statistics_file``. Centres and scales are the median and standard deviation on the training images
    the statistics were fitted on, so the two terms weigh alike."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    part: FeaturePart = Field(description="stage1: the first stage's output averaged over the image; "
                              "penultimate: the vector the final linear layer reads")
    transform: Transform = Field(description="log: log(max(v, 0) + 0.1); l2: divided by its length; none")
    statistics_file: str = Field(default=STATISTICS_FILE, description="mean and precision, safetensors, in the "
                                 "checkpoint directory")
    statistics_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    feature_centre: float
    feature_scale: float = Field(gt=0)
    energy_weight: float = Field(ge=0, description="0: the features alone")
    energy_centre: float = 0.0
    energy_scale: float = Field(default=1.0, gt=0)
    fitted_on: str = Field(description="which images the statistics were fitted on")


class OutOfDistributionRule(BaseModel):
    """How to flag an image as none of the classes: ``model.trust.ood_score(logits, score, temperature)`` (or,
    for ``features``, ``model.trust.feature_score``) below ``threshold`` is out of distribution, and so, for a
    two-sided rule, is one above ``upper_threshold``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score: Literal["energy", "msp", "features"] = Field(
        description="energy: T·logsumexp(logits/T) (Liu et al. 2020); msp: max softmax(logits/T) (Hendrycks & "
                    "Gimpel 2017); features: the network's features, as the features field says (issue 24)")
    temperature: float = Field(gt=0, description="the T inside the score (not necessarily the calibration's)")
    threshold: float = Field(description="in distribution when score >= threshold")
    upper_threshold: float | None = Field(default=None, description="two-sided rule: and score <= this; "
                                          "None = one-sided")
    target_tpr: float = Field(gt=0, le=1, description="share of holdout images the threshold was set to keep")
    holdout_tpr: float = Field(ge=0, le=1, description="share of holdout images it keeps")
    test_tpr: float | None = Field(default=None, ge=0, le=1, description="share of test images it keeps")
    selection: str = Field(description="how the score was chosen among the candidates")
    candidates_auroc: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="candidate 'kind@T' -> {synthetic OOD set: AUROC against the holdout}")
    # Added by issue 24: optional, so every earlier card (a logit rule) still loads and serves as it did.
    features: FeatureScore | None = Field(default=None, description="with score 'features': what it reads")

    @model_validator(mode="after")
    def _features_with_their_score(self) -> OutOfDistributionRule:
        if (self.score == "features") != (self.features is not None):
            raise ValueError("score 'features' needs the features field, and only it may have one")
        return self


class Calibration(BaseModel):
    """Temperature scaling and the OOD rule, both fitted on the holdout split, never on the test set
    (``training.calibrate``); the test figures only report how well that worked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(gt=0, description="probabilities are softmax(logits / temperature)")
    fitted_on: str = Field(description="which images the temperature and threshold were fitted on")
    holdout_images: int = Field(ge=1)
    test_images: int = Field(ge=0)
    ece_bins: int = Field(default=15, ge=1, description="equal-width confidence bins of the ECE")
    test_ece_before: float | None = Field(default=None, description="expected calibration error, 0..1, raw")
    test_ece_after: float | None = Field(default=None, description="the same with the temperature applied")
    test_nll_before: float | None = Field(default=None, description="mean negative log-likelihood (nats), raw")
    test_nll_after: float | None = Field(default=None, description="the same with the temperature applied")
    holdout_nll_before: float
    holdout_nll_after: float
    ood: OutOfDistributionRule
    git_commit: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _installed_torch_version() -> str:
    # Imported here, not at the top: only a card being written lacks the field (save_checkpoint, in a process
    # that holds torch already); a card read from card.json carries its own, so reading one needs no torch.
    import torch

    return torch.__version__


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = 1
    architecture: str
    class_names: tuple[str, ...] = CLASS_NAMES
    input_size: int = INPUT_SIZE
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    parameter_count: int
    training: dict[str, Any] = Field(default_factory=dict, description="the resolved training configuration")
    test_accuracy: float | None = Field(default=None, description="final-epoch top-1 on the test set, 0..1")
    test_accuracy_tta: float | None = Field(default=None, description="the same with horizontal-flip TTA")
    per_class_accuracy: dict[str, float] | None = None
    epochs: int | None = None
    train_seconds: float | None = None
    device: str | None = None
    precision: Literal["bf16", "fp32"] | None = Field(default=None, description="number format of training")
    torch_version: str = Field(default_factory=_installed_torch_version,
                               description="the torch that wrote the weights")
    git_commit: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    data_provenance: str | None = None
    # Added later still (issue 22): optional, so cards written before it (the shipped ones) still load.
    test_set_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="fingerprint of the "
                                        "exact test images and labels test_accuracy was measured on (after any "
                                        "test_limit; training.data.test_set_fingerprint): promotion compares "
                                        "accuracies only between equal fingerprints")
    # Added after format_version 1 was first written: optional, so every earlier card still loads.
    calibration: Calibration | None = Field(default=None, description="temperature and OOD rule (model.trust)")

    @property
    def version(self) -> str:
        """Content-addressed: the same weights always have the same version, different weights never do."""
        return f"{self.architecture}-{self.weights_sha256[:12]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite_weights(weights_path: Path) -> None:
    """Refuse a safetensors file whose floating-point tensors hold NaN or infinity: a network that diverged
    answers every image with NaN probabilities (issue 22: served as 200 with null scores, every label "plane").

    Read with numpy, so that the control plane registers a finished run's weights without importing torch
    (hundreds of MiB it would then keep). numpy has no bfloat16: those tensors alone are read through torch."""
    broken, bfloat16 = [], []
    try:
        with safe_open(weights_path, "numpy") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                if dtype == "BF16":
                    bfloat16.append(name)
                elif dtype in _NUMPY_FLOATS and not np.isfinite(weights.get_tensor(name)).all():
                    broken.append(name)
        if bfloat16:
            import torch

            with safe_open(weights_path, "pt") as weights:
                broken += [name for name in bfloat16 if not torch.isfinite(weights.get_tensor(name)).all()]
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None
    if broken:
        raise non_finite_weights(weights_path, broken)


_NUMPY_FLOATS = frozenset({"F16", "F32", "F64"})


def non_finite_weights(where: Path, broken: list[str]) -> CheckpointError:
    return CheckpointError(f"{where} holds NaN or infinite values in {len(broken)} tensor(s) "
                           f"({', '.join(sorted(broken)[:3])}): the training run diverged; train again with a "
                           "lower learning rate rather than serving it")


def checkpoint_files(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The weights and card paths for a checkpoint directory, or for its ``model.safetensors`` file."""
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    weights = path if path.suffix == ".safetensors" else directory / WEIGHTS_FILE
    return weights, directory / CARD_FILE


def write_card(card: ModelCard, card_path: Path) -> None:
    write_atomically(card_path, card.model_dump_json(indent=2) + "\n")


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    _, card_path = checkpoint_files(path)
    if not card_path.is_file():
        raise CheckpointError(f"no model card at {card_path}: a checkpoint is a directory with "
                              f"{WEIGHTS_FILE} and {CARD_FILE}, as written by `python -m training`")
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text()))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"model card {card_path} is not valid JSON ({error.msg} at line {error.lineno}, "
                              f"column {error.colno})") from None
    except (ValidationError, UnicodeDecodeError) as error:
        raise CheckpointError(f"model card {card_path} is not valid: {_without_values(error)}") from None


def _without_values(error: ValidationError | UnicodeDecodeError) -> str:
    """What is wrong with a card, field by field, without the values: an error message must not become a
    way to read a file's contents (the card may not be one)."""
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return "; ".join(f"{'.'.join(str(part) for part in detail['loc']) or 'the card'}: {detail['msg']}"
                     for detail in error.errors(include_input=False, include_url=False))
