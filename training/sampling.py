"""Which images each step of an epoch trains on, and the random generators that decide it.

Each epoch's shuffle and augmentation draws come from generators seeded afresh from (seed, epoch[, rank]), not
from a stream carried over from earlier epochs. A resumed run therefore replays the interrupted epochs exactly
from nothing but the epoch number; and since the shuffle does not depend on the rank, every rank of a
torchrun job cuts its shard from the same permutation.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that differs whenever any part differs (no arithmetic collisions such as seed+epoch)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*parts))
    return generator


def epoch_batches(
    num_images: int, global_batch: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """Indices for one epoch as a (steps, global_batch // world_size) tensor: this rank's part of each batch.

    Batch k is the same set of images whatever the world size (rank r takes the r-th slice of it), so the
    recipe means the same on 1 or 8 GPUs. The last partial batch is dropped: every step has the same shape,
    which keeps BatchNorm statistics comparable and torch.compile from recompiling.
    """
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} does not split evenly over {world_size} processes")
    steps = num_images // global_batch
    if steps == 0:
        raise ValueError(f"--batch-size {global_batch} is larger than the {num_images} training images")
    order = torch.randperm(num_images, device=device, generator=seeded_generator(device, seed, "shuffle", epoch))
    per_rank = global_batch // world_size
    return order[: steps * global_batch].view(steps, world_size, per_rank)[:, rank]
