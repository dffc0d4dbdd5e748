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

import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from model.checkpoint import file_sha256
from model.labels import NUM_CLASSES
from training.layout import DATA_FOLDER

BATCH_FOLDER = DATA_FOLDER  # the folder torchvision's CIFAR10 reads: its base_folder
BATCH_FILES = tuple(name for name, _ in CIFAR10.train_list + CIFAR10.test_list)
META_FILE = CIFAR10.meta["filename"]


# The rebuilt copy this project is developed with (../shared/cifar10, its README's table of SHA-256s): the
# test set is exact, but training images 4,000-49,999 were decoded from JPEG, which costs a trained model up
# to about a point of accuracy against the original files. A model card trained on it says so.
REBUILT_COPY_SHA256 = {
    "data_batch_1": "756ab69cffccfc6512a758cd6f94d50d6d38cd4685dd3d3918ae260560b4f269",
    "data_batch_2": "8105b2b3faf99c773949a057176e12ece5376d3ba077eb196fb84cc8303a4f59",
    "data_batch_3": "2e8ce0a4ac13569e2cef477973f38bd1716a1fd163d19375a6b39648c12d607e",
    "data_batch_4": "ff5efad5ee2e126bec933cd1114325a06082109efd987b198019642ea29668e2",
    "data_batch_5": "4d73b768db210e0cf5b9cf8544da5ebb5b7c84d05680a1fb99888339e2ae76b7",
    "test_batch": "bfe2b4c5aaaeae1da41e9ba26c047aaeb71b7560201e2f77379865314dd36a26",
}
REBUILT_COPY_NOTE = ("this is the rebuilt copy of ../shared/cifar10: the test set is exact, but 92 % of the "
                     "training images (4,000-49,999) were decoded from JPEG (quality about 75, about 30 dB PSNR), "
                     "which may cost up to about a point of test accuracy against training on the original files")


class DatasetError(RuntimeError):
    """The dataset is missing, corrupt or unreadable; the message says what to do."""


class _CIFAR10WithoutMD5(CIFAR10):
    """torchvision's CIFAR10 with the MD5 check replaced by a presence check.

    Rebuilt copies (../shared/cifar10) hold the official images and labels in pickles whose bytes differ from
    the originals, so every MD5 differs; this is used only when the user passes --skip-integrity-check.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in BATCH_FILES)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


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
    holdout: ImageSet | None  # validation split carved from the end of the training set
    test: ImageSet
    provenance: str           # for the model card: where the data came from and how it was checked


def load_cifar10(
    data_dir: str | os.PathLike[str],
    *,
    download: bool = False,
    skip_integrity_check: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    holdout: int = 0,
) -> CifarSplits:
    train = load_split(data_dir, train=True, download=download, skip_integrity_check=skip_integrity_check)
    test = load_split(data_dir, train=False, download=False, skip_integrity_check=skip_integrity_check)
    train = train.take(0, train_limit)
    test = test.take(0, test_limit)
    # CIFAR-10's training order is already random, so its last N images are a random sample of it.
    if holdout >= len(train):
        raise DatasetError(f"--holdout {holdout} leaves no training images out of {len(train)}; choose fewer")
    validation = train.take(len(train) - holdout) if holdout else None
    train = train.take(0, len(train) - holdout)
    provenance = describe_provenance(data_dir, skip_integrity_check, len(train), holdout, len(test))
    return CifarSplits(train=train, holdout=validation, test=test, provenance=provenance)


def load_split(
    data_dir: str | os.PathLike[str], *, train: bool, download: bool = False, skip_integrity_check: bool = False,
) -> ImageSet:
    """One split as uint8 tensors; every failure becomes a DatasetError with a one-line message."""
    root = Path(data_dir)
    folder = root / BATCH_FOLDER
    dataset_class = _CIFAR10WithoutMD5 if skip_integrity_check else CIFAR10
    if not download:
        _require_files(root, folder)
    try:
        dataset = dataset_class(root=str(root), train=train, download=download)
    except RuntimeError as error:
        if download:
            raise DatasetError(f"could not download CIFAR-10 into {root}: {error}") from None
        failing = [name for name, md5 in CIFAR10.train_list + CIFAR10.test_list
                   if not check_integrity(str(folder / name), md5)]
        raise DatasetError(
            f"{', '.join(failing) or 'batches.meta'} in {folder} fail torchvision's MD5 check: corrupt, or a "
            "rebuilt copy such as ../shared/cifar10 whose pickles differ byte-wise; pass --skip-integrity-check "
            "to load a rebuilt copy, or download afresh with --download into an empty --data-dir"
        ) from None
    except OSError as error:  # network failures during --download, unreadable files
        raise DatasetError(f"could not read or fetch CIFAR-10 in {root}: {error}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
        raise DatasetError(f"{folder} holds a corrupt CIFAR-10 batch file ({type(error).__name__}: {error}); "
                           "replace it with an intact copy, or download afresh with --download") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    if images.shape[1:] != (3, 32, 32) or len(labels) != len(images) or len(labels) == 0:
        raise DatasetError(f"{folder} holds {tuple(images.shape)} images for {len(labels)} labels; "
                           "expected N x 32 x 32 x 3 images with one label each")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{folder} has labels outside 0..{NUM_CLASSES - 1}: not CIFAR-10")
    return ImageSet(images=images, labels=labels)


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


def describe_provenance(
    data_dir: str | os.PathLike[str], skip_integrity_check: bool, train: int, holdout: int, test: int,
) -> str:
    folder = Path(data_dir).resolve() / BATCH_FOLDER
    if skip_integrity_check:
        # The MD5s say nothing about a rebuilt copy, so name its exact bytes (../shared/cifar10's README lists
        # the full SHA-256 of each file for comparison).
        digests = {name: file_sha256(folder / name) for name in BATCH_FILES}
        listed = " ".join(f"{name}={digest[:12]}" for name, digest in digests.items())
        check = f"MD5 check skipped (--skip-integrity-check); SHA-256 prefixes {listed}"
        if digests == REBUILT_COPY_SHA256:
            check += f"; {REBUILT_COPY_NOTE}"
    else:
        check = "torchvision MD5 check passed"
    return (f"CIFAR-10 (cifar-10-batches-py via torchvision) from {folder}; {check}; "
            f"{train} train, {holdout} holdout, {test} test images")
