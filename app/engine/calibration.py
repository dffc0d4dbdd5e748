"""The fallback calibration images of an explicit ``APP_CPU_BACKEND=int8``: the first training images of the
CIFAR-10 copy in ``APP_DATA_DIR`` (the folder training jobs read), as uint8 HWC pixels. They are read only for
a checkpoint without a usable ``calibration.safetensors`` (``app.engine.backend_choice``), which is the set
its verified int8 accuracy was measured with, so a service normally needs no dataset at all.

Static int8 quantization fixes each activation's range from what the network sees on these images
(``model.inference.quantize_int8``); training images, never test images, so a test-set accuracy measured
afterwards stays honest.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from model.inference import CALIBRATION_IMAGES
from training.layout import DATA_FOLDER

BATCH_FILE = "data_batch_1"


class CalibrationUnavailable(RuntimeError):
    """No calibration images where the settings say they are; the message says what to set."""


def calibration_pixels(data_dir: Path, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``(count, 32, 32, 3)`` uint8 pixels from ``data_dir/cifar-10-batches-py/data_batch_1``."""
    path = Path(data_dir) / DATA_FOLDER / BATCH_FILE
    if not path.is_file():
        raise CalibrationUnavailable(
            f"no CIFAR-10 training images at {path} either: set APP_DATA_DIR to the folder holding "
            "cifar-10-batches-py/, or use APP_CPU_BACKEND=auto or fused")
    with open(path, "rb") as handle:  # the local training data set, the same files training unpickles
        entry = pickle.load(handle, encoding="latin1")
    data = np.asarray(entry["data"][:count], dtype=np.uint8)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
