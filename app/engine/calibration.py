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


# A CIFAR-10 batch is a dict of lists, strings and numpy arrays; pickle would otherwise call any global a
# file names, so a planted data_batch_1 could run code in the service. These are the only ones it needs.
_ARRAY_GLOBALS = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                            ("numpy", "ndarray"), ("numpy", "dtype")})


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def calibration_pixels(data_dir: Path, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``(count, 32, 32, 3)`` uint8 pixels from ``data_dir/cifar-10-batches-py/data_batch_1``."""
    path = Path(data_dir) / DATA_FOLDER / BATCH_FILE
    if not path.is_file():
        raise CalibrationUnavailable(
            f"no CIFAR-10 training images at {path} either: set APP_DATA_DIR to the folder holding "
            "cifar-10-batches-py/, or use APP_CPU_BACKEND=auto or fused")
    try:
        with open(path, "rb") as handle:
            entry = _ArraysOnly(handle, encoding="latin1").load()
        data = np.asarray(entry["data"][:count], dtype=np.uint8)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise CalibrationUnavailable(f"{path} is not a CIFAR-10 batch file ({error}); point APP_DATA_DIR at an "
                                     "unpacked cifar-10-python.tar.gz, or use APP_CPU_BACKEND=fused") from None
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
