import pytest
import torch
import torch.nn.functional as F

from training.augment import CROP_PADDING, cutout, normalize, random_crop, random_flip, training_batch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(count: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=_generator(seed))


def test_crop_keeps_shape_and_dtype():
    images = _images()
    cropped = random_crop(images, _generator(1))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8


def test_crop_pads_by_reflection():
    image = _images(1)
    batch = image.expand(64, -1, -1, -1).contiguous()
    cropped = random_crop(batch, _generator(2))
    size = 2 * CROP_PADDING + 1
    reflect = F.pad(image.float(), [CROP_PADDING] * 4, mode="reflect")[0]
    zeros = F.pad(image.float(), [CROP_PADDING] * 4, mode="constant")[0]
    windows = [(dy, dx) for dy in range(size) for dx in range(size)]
    offsets = []
    for crop in cropped.float():
        matches = [(dy, dx) for dy, dx in windows if torch.equal(crop, reflect[:, dy:dy + 32, dx:dx + 32])]
        assert len(matches) == 1, "every crop is one 32x32 window of the reflect-padded image"
        offsets.append(matches[0])
    shifted = [offset for offset in offsets if offset != (CROP_PADDING, CROP_PADDING)]
    assert shifted, "some crops must be shifted, or padding was never exercised"
    dy, dx = shifted[0]
    assert not torch.equal(reflect[:, dy:dy + 32, dx:dx + 32], zeros[:, dy:dy + 32, dx:dx + 32])
    assert len(set(offsets)) > 10, "offsets should vary across the batch"


def test_flip_mirrors_about_half_the_images_and_leaves_the_rest():
    images = _images(200)
    flipped = random_flip(images, _generator(3))
    mirrored = [bool(torch.equal(out, image.flip(2))) for out, image in zip(flipped, images)]
    unchanged = [bool(torch.equal(out, image)) for out, image in zip(flipped, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 60 < sum(mirrored) < 140


def test_same_generator_state_gives_the_same_batch_and_another_seed_does_not():
    images = _images()
    first = training_batch(images, _generator(4), cutout_size=8)
    again = training_batch(images, _generator(4), cutout_size=8)
    other = training_batch(images, _generator(5), cutout_size=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_cutout_zeroes_at_most_one_square_per_image():
    batch = torch.ones(32, 3, 32, 32)
    out = cutout(batch, 8, _generator(6))
    zeroed = (out == 0).all(1).flatten(1).sum(1)
    assert out.shape == batch.shape
    assert (zeroed <= 64).all() and (zeroed > 0).any()
    # Every zeroed pixel lies in one axis-aligned box no larger than the square.
    for image in out:
        rows, columns = torch.nonzero(image[0] == 0, as_tuple=True)
        if len(rows):
            assert rows.max() - rows.min() < 8 and columns.max() - columns.min() < 8


def test_normalize_standardises_and_uses_channels_last():
    images = _images(256)
    batch = normalize(images)
    assert batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert batch.mean().abs() < 0.5 and 0.5 < batch.std() < 2
    assert torch.equal(batch, normalize(images))


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_only_shifts_by_at_most_the_padding(padding):
    # A horizontal ramp: a crop's first column tells how far it was shifted.
    ramp = torch.arange(32, dtype=torch.uint8).expand(16, 3, 32, 32).contiguous()
    cropped = random_crop(ramp, _generator(7), padding=padding)
    assert (cropped[:, 0, 16, 16].long() - 16).abs().max() <= padding
