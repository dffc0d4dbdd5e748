"""Which number format a training step computes in: bf16 autocast where the hardware computes bf16 natively,
float32 elsewhere.

On CUDA, bf16 autocast runs the convolutions on tensor cores without fp16's loss scaling. On a CPU it pays only
where the cores have bf16 dot-product instructions (AVX512-BF16 or AMX-BF16): there it roughly doubles the
training speed (``benchmarks/train_throughput.py`` measures both side by side); elsewhere oneDNN emulates
bf16 and is slower than float32. The detection honours ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``
(``model.cpu_features``): under ``ONEDNN_MAX_CPU_ISA=AVX2`` oneDNN emulates bf16, so ``auto`` trains in float32
there as on an AVX2-only CPU. ``--precision fp32`` keeps the float32 path, which the tests use wherever
they compare exact numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

import torch

from model.cpu_features import CPUINFO, cpu_model_and_flags, masked_flags

Precision = Literal["auto", "bf16", "fp32"]
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = CPUINFO, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo less what the ISA masks in ``environ`` (default:
    this process's) forbid; empty where there is no such file (macOS, Windows)."""
    return masked_flags(cpu_model_and_flags(cpuinfo)[1], environ)


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO, environ: Mapping[str, str] | None = None) -> bool:
    return bool(cpu_flags(cpuinfo, environ) & NATIVE_BF16_CPU_FLAGS)


def resolve_precision(choice: str, device: torch.device, cpuinfo: Path = CPUINFO,
                      environ: Mapping[str, str] | None = None) -> Literal["bf16", "fp32"]:
    """``auto`` is bf16 on CUDA and on CPUs with native bf16, float32 on other CPUs; explicit choices stand."""
    if choice != "auto":
        return "bf16" if choice == "bf16" else "fp32"
    if device.type == "cuda" or cpu_has_native_bf16(cpuinfo, environ):
        return "bf16"
    return "fp32"


def autocast_for(device: torch.device, precision: str = "fp32") -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts for ``device``: bf16 when ``precision`` (already resolved) says so."""
    return functools.partial(torch.amp.autocast, device_type=device.type, dtype=torch.bfloat16,
                             enabled=precision == "bf16")
