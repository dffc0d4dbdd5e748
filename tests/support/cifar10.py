"""A tiny, learnable dataset written in CIFAR-10's on-disk layout, so the real loading code runs in tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from model.labels import NUM_CLASSES

TORCHVISION_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


def synthetic_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Each class is a distinct colour with a bright square at a class-specific place, plus noise:
    easy enough that a small network's loss falls within two epochs."""
    rng = np.random.default_rng(seed)
    labels = [index % NUM_CLASSES for index in range(count)]
    images = rng.integers(0, 60, size=(count, 32, 32, 3), dtype=np.uint8)
    for index, label in enumerate(labels):
        hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.uint8)
        images[index] += hue // 2
        row, column = divmod(label, 5)
        images[index, 4 + row * 12: 14 + row * 12, 2 + column * 6: 8 + column * 6] = 250
    return images, labels


def write_cifar10(root: Path, per_train_batch: int = 20, test_count: int = 50, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` with five train batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]
    for offset, name in enumerate(batches):
        count = test_count if name == "test_batch" else per_train_batch
        images, labels = synthetic_images(count, seed + offset)
        entry = {
            "batch_label": f"synthetic {name}",
            "labels": labels,
            # CIFAR-10 stores each image as 1024 red, then 1024 green, then 1024 blue bytes.
            "data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
            "filenames": [f"{name}_{i:05d}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    meta = {"label_names": TORCHVISION_LABEL_NAMES, "num_cases_per_batch": per_train_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)
    return root


# The SHA-256 of each batch file of the rebuilt copy the project is developed with (its README lists them):
# the test set is exact, the training images 4,000-49,999 were decoded from JPEG. Tests check that a card
# trained on it names these bytes; the product names no particular copy.
REBUILT_COPY_SHA256 = {
    "data_batch_1": "756ab69cffccfc6512a758cd6f94d50d6d38cd4685dd3d3918ae260560b4f269",
    "data_batch_2": "8105b2b3faf99c773949a057176e12ece5376d3ba077eb196fb84cc8303a4f59",
    "data_batch_3": "2e8ce0a4ac13569e2cef477973f38bd1716a1fd163d19375a6b39648c12d607e",
    "data_batch_4": "ff5efad5ee2e126bec933cd1114325a06082109efd987b198019642ea29668e2",
    "data_batch_5": "4d73b768db210e0cf5b9cf8544da5ebb5b7c84d05680a1fb99888339e2ae76b7",
    "test_batch": "bfe2b4c5aaaeae1da41e9ba26c047aaeb71b7560201e2f77379865314dd36a26",
}
