"""Checkpoints for tests: random-init networks saved in the real format (tests need real weights files, not
trained ones)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.architectures import build_model
from model.checkpoint import CARD_FILE, save_checkpoint


def make_checkpoint(directory: Path, seed: int = 0, architecture: str = "resnet18",
                    test_accuracy: float | None = None) -> Path:
    """A random-init checkpoint; its card claims ``test_accuracy`` (to steer the if-better promotion
    policy), by default 0.1 + seed / 100."""
    torch.manual_seed(seed)
    model = build_model(architecture)
    accuracy = 0.1 + seed / 100 if test_accuracy is None else test_accuracy
    save_checkpoint(model, directory, architecture=architecture, test_accuracy=accuracy)
    return directory


def with_input_size(checkpoint: Path, directory: Path, input_size: int) -> Path:
    """A copy of ``checkpoint`` whose card says it takes ``input_size`` pixels (the CIFAR networks pool
    adaptively, so they run at any size)."""
    shutil.copytree(checkpoint, directory)
    card = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps(card | {"input_size": input_size}))
    return directory
