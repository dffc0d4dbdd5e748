"""Batched augmentation on the training device: random crop with 4-px reflect padding, horizontal flip, cutout.

Each function takes a whole batch and an explicit ``torch.Generator`` on the batch's device, so a batch costs a
handful of kernels on the GPU and the same generator state always gives the same output.
"""

from __future__ import annotations

import functools

import torch

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


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, made once per device rather than copied to the GPU every batch."""
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> float32 standardised with the CIFAR-10 statistics, in channels_last (the layout that lets
    cuDNN use tensor cores for every convolution without transposes)."""
    mean, std = _statistics(images.device)
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def training_batch(images: torch.Tensor, generator: torch.Generator, cutout_size: int = 0) -> torch.Tensor:
    """A uint8 batch -> the augmented, normalised float batch the network trains on."""
    images = random_flip(random_crop(images, generator), generator)
    batch = normalize(images)
    return cutout(batch, cutout_size, generator) if cutout_size else batch
