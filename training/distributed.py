"""The process's place in a torchrun job (or a lone process) and the device it trains on.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT); without them this is a job of one.
Each process drives one GPU (cuda:LOCAL_RANK) with NCCL, or the CPU with gloo, which lets the DDP path run in
tests on a machine without GPUs. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.data import ImageSet


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says what does."""


@dataclass(frozen=True)
class Worker:
    """This process: its rank in the torchrun job (0 of 1 when alone) and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def shard(self, data: ImageSet) -> ImageSet:
        """This process's share of an evaluation set: every world_size-th image."""
        return data.take(self.rank, None, self.world_size)


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {choice}: no CUDA device is visible to torch here; use --device cpu")
    index = int(choice.split(":")[1]) if ":" in choice else local_rank
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def start_distributed(device_choice: str) -> Worker:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Under torchrun each process owns the GPU numbered by its local rank, whatever --device names.
    choice = "cuda" if world_size > 1 and device_choice.startswith("cuda") else device_choice
    device = resolve_device(choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Worker(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def stop_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first(worker: Worker) -> Iterator[None]:
    """Rank 0 runs the block first (a download, say); the other ranks wait for it, then run it themselves."""
    if worker.world_size > 1 and not worker.is_main:
        dist.barrier()
    yield
    if worker.world_size > 1 and worker.is_main:
        dist.barrier()
