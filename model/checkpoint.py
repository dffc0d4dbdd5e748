"""The checkpoint format shared by training and serving: safetensors weights plus a JSON model card.

A checkpoint is a directory holding ``model.safetensors`` and ``card.json``. Loading never unpickles
anything: safetensors holds only tensors, the card is JSON validated by pydantic, and the weights' SHA-256,
architecture, class count and parameter count must all agree with the card before a model is returned.
The card's schema and the directory's file names are ``model/card.py``'s, which needs no torch; this module
writes, reads and verifies the weights.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from model.architectures import ARCHITECTURES, build_model, parameter_count
from model.card import (
    CheckpointError,
    FeatureScore,
    ModelCard,
    checkpoint_files,
    file_sha256,
    non_finite_weights,
    read_card,
    write_card,
)
from model.durable import write_atomically
from model.features import GaussianStatistics

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    model: nn.Module
    card: ModelCard
    ood_statistics: GaussianStatistics | None = None  # what a card's feature rule reads; None for a logit rule


def feature_score_of(card: ModelCard) -> FeatureScore | None:
    return card.calibration.ood.features if card.calibration is not None else None


def load_ood_statistics(directory: Path, card: ModelCard) -> GaussianStatistics | None:
    """The statistics the card's OOD rule names, verified against its SHA-256; None for a logit rule."""
    features = feature_score_of(card)
    if features is None:
        return None
    path = directory / features.statistics_file
    if not path.is_file():
        raise CheckpointError(f"the card's OOD rule reads {path}, which is missing: copy the whole checkpoint "
                              "directory, or fit the rule again with python -m training.calibrate")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != features.statistics_sha256:
        raise CheckpointError(f"{path} is not the file the card's OOD rule was fitted with (SHA-256 differs): "
                              "fit the rule again with python -m training.calibrate")
    try:
        return GaussianStatistics.from_bytes(data)
    except (SafetensorError, KeyError) as error:
        raise CheckpointError(f"{path} is not readable OOD statistics: {error}") from None


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    architecture: str,
    dtype: str = "float32",
    **card_fields: Any,
) -> ModelCard:
    """Write ``model``'s weights and a card describing them; the card is written last, so a directory
    with a card always holds the weights it describes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, card_path = checkpoint_files(directory)
    target = _DTYPES[dtype]
    tensors = {
        name: (t.to(target) if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    # safetensors' save_file creates its file with mode 0600, which a container running as another UID
    # cannot read; the bytes go through write_atomically instead, which keeps the usual 0644.
    write_atomically(weights_path, save(tensors, metadata={"architecture": architecture}))
    card = ModelCard(
        architecture=architecture,
        weights_sha256=file_sha256(weights_path),
        weights_dtype=dtype,
        parameter_count=parameter_count(model),
        **card_fields,
    )
    write_card(card, card_path)
    return card


def require_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """``model.card.check_finite_weights`` on tensors already loaded."""
    broken = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not _finite(tensor)]
    if broken:
        raise non_finite_weights(where, broken)


def _finite(tensor: torch.Tensor) -> bool:
    # numpy's isfinite: ResNet-18's weights in about 16 ms on a CPU, where torch.isfinite took over 100 ms
    # (measured on the project's AMD EPYC Zen 4 CPU under load). numpy has no bfloat16: those go via float32.
    values = tensor.detach().cpu()
    if values.dtype == torch.bfloat16:
        values = values.float()
    return bool(np.isfinite(values.numpy()).all())


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; the model comes back in float32, in eval mode, on ``device``."""
    weights_path, _ = checkpoint_files(path)
    card = read_card(path)
    if not weights_path.is_file():
        raise CheckpointError(f"no weights at {weights_path}")
    actual = file_sha256(weights_path)
    if actual != card.weights_sha256:
        raise CheckpointError(
            f"{weights_path} has SHA-256 {actual}, but its card says {card.weights_sha256}: the weights "
            "were changed or belong to another card; copy the checkpoint directory again"
        )
    if card.architecture not in ARCHITECTURES:
        raise CheckpointError(f"card names unknown architecture {card.architecture!r}; "
                              f"known: {', '.join(ARCHITECTURES)}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None
    require_finite(tensors, weights_path)
    model = build_model(card.architecture, num_classes=len(card.class_names))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {weights_path} do not fit a {card.architecture} with "
            f"{len(card.class_names)} classes: {error}"
        ) from None
    if parameter_count(model) != card.parameter_count:
        raise CheckpointError(f"card says {card.parameter_count} parameters, the weights have "
                              f"{parameter_count(model)}")
    return Checkpoint(model=model.to(device).eval(), card=card,
                      ood_statistics=load_ood_statistics(weights_path.parent, card))
