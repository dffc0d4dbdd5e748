import numpy as np
import torch

from benchmarks.ood import ood_sets
from benchmarks.ood_families import FAMILIES, coloured_digits, held_out_families, jpeg_round_trip, photo_like, ycbcr_detail


def test_the_digits_are_the_1797_bundled_ones_upscaled_and_coloured():
    digits = coloured_digits(torch.Generator().manual_seed(0))
    assert digits.shape == (1797, 3, 32, 32) and digits.dtype == torch.uint8
    # Paper, ink and the blends between them along the strokes: more than two colours in each image.
    assert all(len(image.reshape(3, -1).T.unique(dim=0)) > 2 for image in digits[:20]), "a digit, not a fill"
    assert len({tuple(image[:, 0, 0].tolist()) for image in digits[:50]}) > 40, "paper colours vary by image"


def test_every_set_is_made_with_the_benchmark_seed_in_its_group():
    cifar = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    groups = ood_sets(cifar, 20, 2)
    assert {group: set(sets) for group, sets in groups.items()} == {
        "in_distribution": {"test", "photo_like", "test_jpeg_q75"},
        "tuned_on": {"gaussian_noise", "uniform_noise", "constant_colour", "shuffled_pixels"},
        "held_out": {*FAMILIES, "digits"},
    }
    assert all(len(images) == 20 for group in ("tuned_on", "held_out") for name, images in groups[group].items()
               if name != "digits")
    again = ood_sets(cifar, 20, 2)
    for group, sets in groups.items():
        for name, images in sets.items():
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32), name
            assert torch.equal(again[group][name], images), f"{name} is not reproducible"


def test_each_held_out_family_is_varied_and_not_a_plain_fill():
    sets = held_out_families(12, 5)
    for name, images in sets.items():
        assert images.float().std(dim=(1, 2, 3)).min() > 5, f"{name} holds a flat image"
        assert len({tuple(image.flatten()[:64].tolist()) for image in images}) == len(images), f"{name} repeats"
    other = held_out_families(12, 6)
    assert not any(torch.equal(other[name], sets[name]) for name in FAMILIES), "the seed chooses the images"


def test_photo_like_images_stay_close_to_the_originals():
    rng = np.random.default_rng(0)
    # Smooth images, as photos are: JPEG and the resampling change them a little, pixel noise a lot.
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(0, 255, (4, 3, 8, 8))).float(), size=32,
                                             mode="bilinear", align_corners=False).round().to(torch.uint8)
    fitted = photo_like(smooth)
    assert fitted.shape == smooth.shape and fitted.dtype == torch.uint8
    assert (fitted.float() - smooth.float()).abs().mean() < 6


def test_the_jpeg_round_trip_loses_fine_detail_but_keeps_the_image():
    rng = np.random.default_rng(1)
    # Pixel-level detail (the exact test images' kind) is what JPEG at quality 75 takes away; the image stays.
    detailed = torch.from_numpy(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    smooth = torch.nn.functional.interpolate(detailed.float(), scale_factor=0.25, mode="area")
    smooth = torch.nn.functional.interpolate(smooth, size=32, mode="bilinear").round().to(torch.uint8)
    for images in (detailed, smooth):
        back = jpeg_round_trip(images)
        assert back.shape == images.shape and back.dtype == torch.uint8
        assert not torch.equal(back, images), "JPEG is lossy"
    change = {name: (jpeg_round_trip(images).float() - images.float()).abs().mean()
              for name, images in (("detailed", detailed), ("smooth", smooth))}
    assert change["smooth"] < 6 < change["detailed"], change


def test_chroma_subsampling_shows_as_less_colour_detail_not_less_brightness_detail():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    exact, jpeg = ycbcr_detail(images), ycbcr_detail(jpeg_round_trip(images, quality=95))
    assert jpeg["Cb"] < 0.7 * exact["Cb"] and jpeg["Cr"] < 0.7 * exact["Cr"], (exact, jpeg)
    assert jpeg["Y"] > 0.7 * exact["Y"], (exact, jpeg)
    grey = images[:, :1].expand(-1, 3, -1, -1)
    assert ycbcr_detail(grey)["Cb"] < 1 < ycbcr_detail(grey)["Y"], "grey images carry no colour detail"
