import pytest
import torch
import torch.nn.functional as F

from training import augment
from training.augment import (
    CROP_PADDING,
    cutout,
    greyscale,
    normalize,
    photo_like,
    random_crop,
    random_flip,
    random_rescale,
    random_zoom,
    training_batch,
)


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


def test_photo_like_changes_nothing_at_zero_and_is_reproducible():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(photo_like(images, _generator(1), 0.0), images.float())
    first, again = photo_like(images, _generator(2), 0.5), photo_like(images, _generator(2), 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, photo_like(images, _generator(3), 0.5))
    assert first.min() >= 0 and first.max() <= 255


def test_greyscale_gives_each_channel_the_images_luma():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).float()
    grey = greyscale(images)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(grey[:, channel], luma)


def test_at_probability_one_a_third_of_the_images_turn_grey():
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    out = photo_like(images, _generator(4), 1.0)
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 60 < int(grey.sum()) < 140  # GREYSCALE_SHARE of 300 is 100


def test_zooming_out_leaves_a_white_or_a_mirrored_margin(monkeypatch):
    monkeypatch.setattr(augment, "ZOOM_RANGE", (0.5, 0.5))
    black = torch.zeros(64, 3, 32, 32)
    out = random_zoom(black, _generator(5))
    corners = out[:, :, 0, 0].mean(1)
    assert set(corners.tolist()) == {0.0, 255.0}, "margins were neither white nor the mirrored image"
    # Half the side: the image covers a quarter of a white-margined frame (give or take its blended edge).
    image_share = (out[corners == 255] < 128).float().mean(dim=(1, 2, 3))
    assert ((image_share > 0.2) & (image_share < 0.3)).all()


def test_zooming_in_keeps_the_frame_filled_with_the_image(monkeypatch):
    monkeypatch.setattr(augment, "ZOOM_RANGE", (1.3, 1.3))
    flat = torch.full((64, 3, 32, 32), 10.0)
    out = random_zoom(flat, _generator(6))
    # The outermost row or column may blend with the margin by a fraction of a pixel; inside it, only image.
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], flat[:, :, 1:-1, 1:-1])


def test_rescaling_keeps_the_size_and_loses_fine_detail():
    checkerboard = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255.0
    images = checkerboard.expand(8, 3, 32, 32).contiguous()
    out = random_rescale(images, _generator(7))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    detail = (out[..., 1:] - out[..., :-1]).abs().mean()
    assert detail < 0.5 * (images[..., 1:] - images[..., :-1]).abs().mean()
