import shutil
from pathlib import Path

import pytest
import torch

from model.labels import NUM_CLASSES
from tests.support.cifar10 import REBUILT_COPY_SHA256, synthetic_images
from training.data import DatasetError, load_cifar10, load_split


def test_loads_the_on_disk_layout_as_uint8_tensors(synthetic_cifar10):
    data = load_cifar10(synthetic_cifar10, skip_integrity_check=True)
    assert data.train.images.shape == (100, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (50, 3, 32, 32)
    assert data.train.labels.dtype == torch.int64 and data.holdout is None
    # The first training image is the first of data_batch_1, channels first.
    images, labels = synthetic_images(20, seed=0)
    assert torch.equal(data.train.images[0], torch.from_numpy(images[0]).permute(2, 0, 1))
    assert data.train.labels[:20].tolist() == labels
    assert "MD5 check skipped" in data.provenance and "100 train" in data.provenance


def test_holdout_and_limits_carve_the_splits(synthetic_cifar10):
    data = load_cifar10(synthetic_cifar10, skip_integrity_check=True, train_limit=60, test_limit=10, holdout=20)
    full = load_split(synthetic_cifar10, train=True, skip_integrity_check=True)
    assert (len(data.train), len(data.holdout), len(data.test)) == (40, 20, 10)
    assert torch.equal(data.holdout.images, full.images[40:60])
    assert torch.equal(data.train.images, full.images[:40])
    assert data.holdout_start == 40


def test_a_holdout_from_the_first_images_trains_on_the_rest(synthetic_cifar10):
    data = load_cifar10(synthetic_cifar10, skip_integrity_check=True, train_limit=60, holdout=20, holdout_from="first")
    full = load_split(synthetic_cifar10, train=True, skip_integrity_check=True)
    assert (len(data.train), len(data.holdout), data.holdout_start) == (40, 20, 0)
    assert torch.equal(data.holdout.images, full.images[:20])
    assert torch.equal(data.train.images, full.images[20:60])
    with pytest.raises(DatasetError, match="--holdout-from 'middle'"):
        load_cifar10(synthetic_cifar10, skip_integrity_check=True, holdout=20, holdout_from="middle")


def test_a_holdout_as_large_as_the_training_set_is_refused(synthetic_cifar10):
    with pytest.raises(DatasetError, match="--holdout"):
        load_cifar10(synthetic_cifar10, skip_integrity_check=True, holdout=100)


def test_integrity_check_refuses_a_rebuilt_copy_and_names_the_flag(synthetic_cifar10):
    with pytest.raises(DatasetError, match="--skip-integrity-check") as raised:
        load_split(synthetic_cifar10, train=True)
    assert "data_batch_1" in str(raised.value) and "\n" not in str(raised.value)
    assert len(load_split(synthetic_cifar10, train=True, skip_integrity_check=True)) == 100


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="--download"):
        load_split(tmp_path, train=True)


def test_data_dir_pointing_inside_the_layout_suggests_its_parent(synthetic_cifar10):
    with pytest.raises(DatasetError, match="should be its parent"):
        load_split(synthetic_cifar10 / "cifar-10-batches-py", train=True)


def test_missing_file_is_named(synthetic_cifar10, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_cifar10, copy)
    (copy / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3 missing"):
        load_split(copy, train=True, skip_integrity_check=True)


def test_corrupt_batch_is_one_clear_error(synthetic_cifar10, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_cifar10, copy)
    (copy / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="corrupt"):
        load_split(copy, train=False, skip_integrity_check=True)


@pytest.mark.real_data
def test_real_cifar10_has_50000_train_and_10000_test_images_balanced(real_cifar10):
    data = load_cifar10(real_cifar10, skip_integrity_check=True)
    assert data.train.images.shape == (50_000, 3, 32, 32)
    assert data.test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.train.labels, minlength=NUM_CLASSES).tolist() == [5000] * NUM_CLASSES
    assert torch.bincount(data.test.labels, minlength=NUM_CLASSES).tolist() == [1000] * NUM_CLASSES
    # ../shared/cifar10's README: data_batch_1 starts with these class counts and mean pixel values.
    assert torch.bincount(data.train.labels[:10_000]).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001,
                                                                  1025, 981]
    mean = data.test.images.float().mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([126.02, 123.71, 114.85]), atol=0.05)
    # The card names the copy's exact bytes, which the copy's maker lists (tests/support/cifar10.py keeps them).
    for name, digest in REBUILT_COPY_SHA256.items():
        assert f"{name}={digest[:12]}" in data.provenance


@pytest.mark.real_data
def test_real_rebuilt_copy_needs_the_explicit_opt_out(real_cifar10):
    with pytest.raises(DatasetError, match="--skip-integrity-check"):
        load_split(real_cifar10, train=False)


def test_the_test_set_fingerprint_changes_with_any_label_or_pixel(synthetic_cifar10):
    from training.data import ImageSet, load_split, test_set_fingerprint

    test = load_split(synthetic_cifar10, train=False, skip_integrity_check=True)
    same = ImageSet(test.images.clone(), test.labels.clone())
    assert test_set_fingerprint(same) == test_set_fingerprint(test)
    relabelled = ImageSet(test.images, test.labels.clone())
    relabelled.labels[7] = (relabelled.labels[7] + 1) % 10
    repainted = ImageSet(test.images.clone(), test.labels)
    repainted.images[3, 1, 5, 5] ^= 1
    fingerprints = {test_set_fingerprint(s) for s in (test, relabelled, repainted, test.take(0, len(test) - 1))}
    assert len(fingerprints) == 4


class _Payload:
    """What a hostile batch file would carry: unpickling it calls os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_when_the_integrity_check_is_skipped(synthetic_cifar10, tmp_path):
    import pickle

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_cifar10, copy)
    with open(copy / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": _Payload(), "labels": [0]}, handle)
    with pytest.raises(DatasetError, match=r"no CIFAR-10 pickle \(it names posix.system"):
        load_split(copy, train=False, skip_integrity_check=True)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_pickled_by_any_protocol_still_load(synthetic_cifar10, tmp_path, protocol):
    import pickle

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_cifar10, copy)
    batch = copy / "cifar-10-batches-py" / "test_batch"
    with open(batch, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    with open(batch, "wb") as handle:
        pickle.dump(entry, handle, protocol=protocol)
    again = load_split(copy, train=False, skip_integrity_check=True)
    assert torch.equal(again.images, load_split(synthetic_cifar10, train=False, skip_integrity_check=True).images)
