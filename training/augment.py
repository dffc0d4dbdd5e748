"""Batched augmentation on the training device: random crop with 4-px reflect padding, horizontal flip, cutout,
and the photo-like changes an upload goes through before the service sees it (``photo_like``).

Each function takes a whole batch and an explicit ``torch.Generator`` on the batch's device, so a batch costs a
handful of kernels on the GPU and the same generator state always gives the same output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.labels import CIFAR10_MEAN, CIFAR10_STD

CROP_PADDING = 4


def _reflected(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Map positions in -size+1 .. 2*size-2 onto 0 .. size-1 as reflect padding does (edge not repeated)."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def random_crop(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Crop each image at a random offset from the image reflect-padded by ``padding`` on every side.

    The padded image is never built: each output row and column is gathered from its reflected source
    position, which costs two gathers for the whole batch.
    """
    count, channels, height, width = images.shape
    device = images.device
    shift_y = torch.randint(-padding, padding + 1, (count,), device=device, generator=generator)
    shift_x = torch.randint(-padding, padding + 1, (count,), device=device, generator=generator)
    rows = _reflected(shift_y[:, None] + torch.arange(height, device=device), height)
    columns = _reflected(shift_x[:, None] + torch.arange(width, device=device), width)
    images = images.gather(2, rows[:, None, :, None].expand(count, channels, height, width))
    return images.gather(3, columns[:, None, None, :].expand(count, channels, height, width))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square at a random centre, which may lie near the border so the square is partly
    outside (DeVries & Taylor 2017, arXiv:1708.04552). Applied after normalisation, so zero is the mean pixel."""
    count, _, height, width = images.shape
    device = images.device
    top = torch.randint(0, height, (count, 1), device=device, generator=generator) - size // 2
    left = torch.randint(0, width, (count, 1), device=device, generator=generator) - size // 2
    rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
    inside_rows = (rows >= top) & (rows < top + size)
    inside_columns = (columns >= left) & (columns < left + size)
    square = inside_rows[:, :, None] & inside_columns[:, None, :]
    return images.masked_fill(square[:, None], 0.0)


# The photo-like changes (issue 24; benchmarks/photo_robustness.py measures what they buy). Zoom spans the
# crops a user makes (in) and the margins of a cut-out or a letterbox (out); the down-and-up rescale through
# 16-28 px is the softness an image keeps after being enlarged and fitted back to 32 px; greyscale is a
# black-and-white photo. The margin is white half the time, as the service composites transparency over white.
ZOOM_RANGE = (0.75, 1.3)
RESCALE_SIDES = (16, 28)
GREYSCALE_SHARE = 1 / 3  # of the probability given: greyscale is the rarest of the three in real uploads
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what Pillow's convert("L") uses
_WHITE = 255.0


def _chosen(count: int, probability: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(count, device=device, generator=generator) < probability


def random_zoom(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zoom each float image by a factor in ``ZOOM_RANGE`` about a point that keeps the subject in view; where
    zooming out uncovers a margin it is white or the image mirrored, half and half."""
    count, _, height, width = images.shape
    device = images.device
    low, high = ZOOM_RANGE
    zoom = low + (high - low) * torch.rand(count, device=device, generator=generator)
    reach = (1 - 1 / zoom).abs()  # how far the centre may move and still keep the frame filled (or centred)
    shift = (2 * torch.rand(count, 2, device=device, generator=generator) - 1) * reach[:, None]
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [count, 1, height, width], align_corners=False)
    mirrored = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    inside = F.grid_sample(images.new_ones(count, 1, height, width), grid, mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    framed = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    white = framed + (1 - inside) * _WHITE
    use_white = _chosen(count, 0.5, generator, device)[:, None, None, None]
    return torch.where(use_white, white, mirrored)


def random_rescale(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shrink the batch to one random side in ``RESCALE_SIDES`` (antialiased) and enlarge it back: the
    detail lost is what an enlarge-then-fit round trip loses."""
    size = images.shape[-2:]
    low, high = RESCALE_SIDES
    side = int(torch.randint(low, high + 1, (1,), device=images.device, generator=generator))
    small = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False).clamp(0, _WHITE)


def greyscale(images: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * luma).sum(1, keepdim=True).expand_as(images)


def photo_like(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """A uint8 batch -> float 0..255, where each image independently is zoomed (``random_zoom``) with
    ``probability``, rescaled down and up (``random_rescale``) with ``probability`` and made greyscale with
    ``probability * GREYSCALE_SHARE``. Every draw is made for every image, so the generator advances the same
    way whatever was chosen."""
    images = images.float()
    count, device = len(images), images.device
    zoomed, rescaled = _chosen(count, probability, generator, device), _chosen(count, probability, generator, device)
    grey = _chosen(count, probability * GREYSCALE_SHARE, generator, device)
    images = torch.where(zoomed[:, None, None, None], random_zoom(images, generator), images)
    images = torch.where(rescaled[:, None, None, None], random_rescale(images, generator), images)
    return torch.where(grey[:, None, None, None], greyscale(images), images)


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, made once per device rather than copied to the GPU every batch."""
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) RGB -> float32 standardised with the CIFAR-10 statistics, in channels_last (the
    layout that lets cuDNN use tensor cores for every convolution without transposes)."""
    mean, std = _statistics(images.device)
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def training_batch(
    images: torch.Tensor, generator: torch.Generator, cutout_size: int = 0, photo_probability: float = 0.0,
) -> torch.Tensor:
    """A uint8 batch -> the augmented, normalised float batch the network trains on."""
    images = random_flip(random_crop(images, generator), generator)
    if photo_probability:
        images = photo_like(images, generator, photo_probability)
    batch = normalize(images)
    return cutout(batch, cutout_size, generator) if cutout_size else batch
