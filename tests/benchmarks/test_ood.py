import torch

from benchmarks.ood import coloured_digits, ood_sets


def test_the_digits_are_the_1797_bundled_ones_upscaled_and_coloured():
    digits = coloured_digits(torch.Generator().manual_seed(0))
    assert digits.shape == (1797, 3, 32, 32) and digits.dtype == torch.uint8
    # Paper, ink and the blends between them along the strokes: more than two colours in each image.
    assert all(len(image.reshape(3, -1).T.unique(dim=0)) > 2 for image in digits[:20]), "a digit, not a fill"
    assert len({tuple(image[:, 0, 0].tolist()) for image in digits[:50]}) > 40, "paper colours vary by image"

def test_every_set_is_made_with_the_benchmark_seed():
    cifar = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    sets = ood_sets(cifar, 20, 2)
    assert set(sets) == {"digits", "gaussian_noise", "uniform_noise", "constant_colour", "shuffled_pixels"}
    assert all(len(images) == 20 for name, images in sets.items() if name != "digits")
    assert torch.equal(ood_sets(cifar, 20, 2)["uniform_noise"], sets["uniform_noise"])
