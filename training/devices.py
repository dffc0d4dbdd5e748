"""The device names that training's ``--device`` and the service's ``APP_DEVICE`` and ``APP_TRAINING_DEVICE``
accept. Which device a name resolves to is decided where it runs (training.distributed, app.engine.device)."""

import argparse
import re

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(text: str) -> bool:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    return _DEVICE.fullmatch(text) is not None


def parse_device_name(text: str) -> str:
    """An argparse ``type=`` for a ``--device`` option."""
    if not is_device_name(text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, got {text!r}")
    return text
