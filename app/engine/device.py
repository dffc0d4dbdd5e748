"""Which device the engine runs on, and how many CPU threads each part of the service gets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU; an explicit CUDA device must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"APP_DEVICE={setting}, but torch sees no CUDA device; set APP_DEVICE=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"APP_DEVICE={setting}, but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Images per forward pass when APP_MAX_BATCH_SIZE is 0: larger batches amortise per-pass overhead until they
# outgrow the CPU's caches. benchmarks/serve_load.py found throughput peaking at 16 (about 10% above 8 and 32);
# on a GPU a 32x32 ResNet-50 needs large batches to fill the device, and 128 keeps a forward pass to a few milliseconds.
AUTO_BATCH_SIZE = {"cpu": 16, "cuda": 128}


def resolve_batch_size(device: torch.device, setting: int) -> int:
    return setting or AUTO_BATCH_SIZE.get(device.type, 16)


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int  # intra-op threads of one forward pass
    parallel_batches: int  # forward passes running at once, each on its own device thread
    decode_threads: int  # image decoding and request parsing


def plan_threads(device: torch.device, torch_threads: int = 0, parallel_batches: int = 0,
                 decode_threads: int = 0) -> ThreadPlan:
    """Fill in the automatic (0) settings for this machine.

    On the CPU the default is one forward pass per core, each single-threaded: in the serving benchmark
    (benchmarks/serve_load.py, benchmarks/README.md) that served more images/s than one pass using every
    core, because a pass split over cores waits at every layer for its slowest thread, and the HTTP work
    preempts one of them all the time. On CUDA one pass at a time owns the GPU and the CPU threads
    feed it.
    """
    cores = available_cores()
    if device.type == "cuda":
        plan = ThreadPlan(torch_threads or min(4, cores), parallel_batches or 1, decode_threads or min(8, cores))
    else:
        parallel = parallel_batches or cores
        plan = ThreadPlan(torch_threads or max(1, cores // parallel), parallel, decode_threads or min(4, cores))
    return plan


def apply_thread_plan(plan: ThreadPlan) -> None:
    """torch's thread pool is process-wide: set it once, before the first forward pass."""
    torch.set_num_threads(plan.torch_threads)
    try:
        torch.set_num_interop_threads(1)  # the engine's own device threads are the parallelism
    except RuntimeError:
        pass  # already set, or inter-op work already ran in this process (a second app in tests)
    logger.info("thread plan", extra={"torch_threads": plan.torch_threads,
                                      "parallel_batches": plan.parallel_batches,
                                      "decode_threads": plan.decode_threads})
