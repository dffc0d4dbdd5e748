"""CIFAR-10 from its standard on-disk layout (``cifar-10-batches-py``), read through torchvision, as uint8 tensors.

The whole dataset is 180 MB as uint8, so it lives on the training device and batches are cut from it by index:
no DataLoader, no worker processes, no host-to-device copies per step.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from model.card import file_sha256
from model.labels import NUM_CLASSES
from training.config import HOLDOUT_ENDS
from training.layout import DATA_FOLDER

BATCH_FOLDER = DATA_FOLDER  # the folder torchvision's CIFAR10 reads: its base_folder
BATCH_FILES = tuple(name for name, _ in CIFAR10.train_list + CIFAR10.test_list)
META_FILE = CIFAR10.meta["filename"]


class DatasetError(RuntimeError):
    """The dataset is missing, corrupt or unreadable; the message says what to do."""


# What a CIFAR-10 batch pickle may name: a dict of lists and one uint8 numpy array. The official files
# (pickled by Python 2's numpy) and copies re-pickled since name only these; a pickle may otherwise name any
# callable, which loading runs. With the MD5 check on, torchvision only ever unpickles the official bytes;
# with it skipped (--skip-integrity-check) the bytes are unknown, so they go through this allow-list instead.
_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # protocols 0-4
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
})


class ForbiddenPickle(pickle.UnpicklingError):
    """A batch file's pickle names a callable no CIFAR-10 batch needs; it was not loaded."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise ForbiddenPickle(f"it names {module}.{name}, which no CIFAR-10 batch holds")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """One batch file, through the allow-list (``_PICKLE_GLOBALS``): never runs code a pickle names."""
    with open(path, "rb") as handle:
        entry = _BatchUnpickler(handle, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"it holds a {type(entry).__name__}, not a batch")
    return entry


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32, RGB
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def take(self, start: int, stop: int | None = None, step: int = 1) -> ImageSet:
        return ImageSet(self.images[start:stop:step], self.labels[start:stop:step])


@dataclass(frozen=True)
class CifarSplits:
    train: ImageSet
    holdout: ImageSet | None  # validation split carved from one end of the training set (HOLDOUT_ENDS)
    test: ImageSet
    provenance: str           # for the model card: where the data came from and how it was checked
    holdout_start: int = 0    # the first held-out image's index in the training set


def load_cifar10(
    data_dir: str | os.PathLike[str],
    *,
    download: bool = False,
    skip_integrity_check: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    holdout: int = 0,
    holdout_from: str = "last",
) -> CifarSplits:
    train = load_split(data_dir, train=True, download=download, skip_integrity_check=skip_integrity_check)
    test = load_split(data_dir, train=False, download=False, skip_integrity_check=skip_integrity_check)
    train = train.take(0, train_limit)
    test = test.take(0, test_limit)
    # CIFAR-10's training order is already random, so its first or last N images are a random sample of it.
    if holdout >= len(train):
        raise DatasetError(f"--holdout {holdout} leaves no training images out of {len(train)}; choose fewer")
    first = holdout_start(holdout_from, len(train), holdout)
    validation = train.take(first, first + holdout) if holdout else None
    train = train.take(holdout) if holdout_from == "first" else train.take(0, len(train) - holdout)
    provenance = describe_provenance(data_dir, skip_integrity_check, len(train), holdout, len(test))
    return CifarSplits(train=train, holdout=validation, test=test, provenance=provenance, holdout_start=first)


def load_split(
    data_dir: str | os.PathLike[str], *, train: bool, download: bool = False, skip_integrity_check: bool = False,
) -> ImageSet:
    """One split as uint8 tensors; every failure becomes a DatasetError with a one-line message.

    ``skip_integrity_check`` is for a copy of CIFAR-10 that is not byte-identical to torchvision's download (the
    same images and labels, pickled again): its files fail the MD5 check, so they are read without it, each
    through an allow-list of what a batch pickle may hold."""
    root = Path(data_dir)
    folder = root / BATCH_FOLDER
    if not download or (skip_integrity_check and folder.is_dir()):
        _require_files(root, folder)
    try:
        if skip_integrity_check and folder.is_dir():
            data, targets = _read_unverified(folder, train)
        else:
            dataset = CIFAR10(root=str(root), train=train, download=download)  # MD5-checked, then unpickled
            data, targets = dataset.data, dataset.targets
    except RuntimeError as error:
        if download:
            raise DatasetError(f"could not download CIFAR-10 into {root}: {error}") from None
        failing = [name for name, md5 in CIFAR10.train_list + CIFAR10.test_list
                   if not check_integrity(str(folder / name), md5)]
        raise DatasetError(
            f"{', '.join(failing) or 'batches.meta'} in {folder} fail torchvision's MD5 check: corrupt, or a copy "
            "of CIFAR-10 that is not byte-identical to torchvision's download (the same images re-pickled); pass "
            "--skip-integrity-check to load such a copy, or download afresh with --download into an empty "
            "--data-dir"
        ) from None
    except ForbiddenPickle as error:
        raise DatasetError(f"{folder} holds a batch file that is no CIFAR-10 pickle ({error}); it was not "
                           "loaded. Replace the folder with an intact copy, or download afresh with --download "
                           "into an empty --data-dir") from None
    except OSError as error:  # network failures during --download, unreadable files
        raise DatasetError(f"could not read or fetch CIFAR-10 in {root}: {error}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise DatasetError(f"{folder} holds a corrupt CIFAR-10 batch file ({type(error).__name__}: {error}); "
                           "replace it with an intact copy, or download afresh with --download") from None
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    labels = torch.tensor(targets, dtype=torch.int64)
    if images.shape[1:] != (3, 32, 32) or len(labels) != len(images) or len(labels) == 0:
        raise DatasetError(f"{folder} holds {tuple(images.shape)} images for {len(labels)} labels; "
                           "expected N x 32 x 32 x 3 images with one label each")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{folder} has labels outside 0..{NUM_CLASSES - 1}: not CIFAR-10")
    return ImageSet(images=images, labels=labels)


def _read_unverified(folder: Path, train: bool) -> tuple[np.ndarray, list[int]]:
    """The batch files of one split as torchvision lays them out (N x 32 x 32 x 3 uint8, labels), read
    through ``read_batch``."""
    names = [name for name, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
    arrays: list[np.ndarray] = []
    targets: list[int] = []
    for name in names:
        entry = read_batch(folder / name)
        data = np.asarray(entry["data"], dtype=np.uint8)
        arrays.append(data.reshape(-1, 3, 32, 32))
        targets.extend(int(label) for label in entry.get("labels", entry.get("fine_labels", [])))
    return np.ascontiguousarray(np.vstack(arrays).transpose(0, 2, 3, 1)), targets


def test_set_fingerprint(test: ImageSet) -> str:
    """SHA-256 over exactly the images and labels a test accuracy is measured on, in order (after any
    ``--test-limit``): two cards' accuracies compare only when their fingerprints are equal. It covers the
    decoded pixels rather than the files, so the same images compare equal whatever pickle holds them."""
    digest = hashlib.sha256(b"cifar-serve test set v1\0")
    digest.update(len(test).to_bytes(8, "little"))
    digest.update(test.labels.cpu().numpy().astype("<i8").tobytes())
    digest.update(test.images.cpu().contiguous().numpy().astype("uint8").tobytes())  # N x 3 x 32 x 32, RGB
    return digest.hexdigest()


def _require_files(root: Path, folder: Path) -> None:
    if not folder.is_dir():
        hint = (f"; --data-dir should be its parent, {root.parent}" if root.name == BATCH_FOLDER
                else "; add --download to fetch it (needs the internet)")
        raise DatasetError(f"no CIFAR-10 in {root}: expected the folder {folder}{hint}")
    missing = [name for name in (*BATCH_FILES, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 in {folder} is incomplete: {', '.join(missing)} missing; "
                           "copy the whole cifar-10-batches-py folder, or add --download")


def holdout_start(holdout_from: str, images: int, holdout: int) -> int:
    """The index of the first held-out image among ``images`` (the training set before the holdout is taken)."""
    if holdout_from not in HOLDOUT_ENDS:
        raise DatasetError(f"--holdout-from {holdout_from!r}: choose one of {', '.join(HOLDOUT_ENDS)}")
    return 0 if holdout_from == "first" else images - holdout


def describe_provenance(
    data_dir: str | os.PathLike[str], skip_integrity_check: bool, train: int, holdout: int, test: int,
) -> str:
    folder = Path(data_dir).resolve() / BATCH_FOLDER
    if skip_integrity_check:
        # The MD5s say nothing about a copy that is not byte-identical, so name its exact bytes: whoever made
        # the copy can compare them with the SHA-256s they publish for it.
        digests = {name: file_sha256(folder / name) for name in BATCH_FILES}
        listed = " ".join(f"{name}={digest[:12]}" for name, digest in digests.items())
        check = f"MD5 check skipped (--skip-integrity-check); SHA-256 prefixes {listed}"
    else:
        check = "torchvision MD5 check passed"
    return (f"CIFAR-10 (cifar-10-batches-py via torchvision) from {folder}; {check}; "
            f"{train} train, {holdout} holdout, {test} test images")
