"""The CPU instruction-set features the project's kernels depend on, as the libraries that run them see them:
the CPU's own flags, capped by the masks PyTorch and oneDNN honour.

``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``) caps ATen's vectorised kernels, and
``ONEDNN_MAX_CPU_ISA`` (older name ``DNNL_MAX_CPU_ISA``; ``AVX2``, ``AVX512_CORE``, ``AVX512_CORE_VNNI``,
``AVX512_CORE_BF16``, ``AVX512_CORE_AMX``, ``ALL``, ...) caps oneDNN's convolutions, int8 and bf16 kernels. Set
on an AVX-512 machine, they make it run the kernels an AVX2-only CPU runs; honouring them here too makes the
project's own decisions follow (the machine identity a backend report is keyed by, bf16 training's ``auto``),
so the AVX2 case can be tested on a larger CPU:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest -m isa

Where masking is a faithful stand-in for a smaller CPU, and where it is not (measured on an AMD EPYC Zen 4,
torch 2.14, ONNX Runtime 1.32: the logits of each backend under each mask against unmasked ones,
benchmarks/README.md "One product on every CPU"):

- oneDNN honours its mask: the bf16 and int8 backends' numbers change under ``ONEDNN_MAX_CPU_ISA=AVX2``
  (logits by up to 0.03 and 0.05), and bf16 becomes emulated (slow), as on an AVX2 CPU.
- ATen honours its own (``torch.backends.cpu.get_cpu_capability()`` says ``AVX2``); no backend's logits moved
  under it alone.
- ONNX Runtime ignores both: its MLAS kernels choose by CPUID, so the ``onnx`` backend keeps its AVX-512
  kernels and speed under the mask (its answers are exact float32 either way, so only its speed is unfaithful).
- fbgemm has its own mask (``FBGEMM_ENABLE_INSTRUCTIONS``) and ignores these two; torch's x86 int8 engine
  ran its convolutions in oneDNN here, so setting it as well changed no logit.
- No mask changes the cache sizes, the memory bandwidth or the clock: speeds under a mask are an AVX2 CPU's
  kernels on this CPU's memory system, not an AVX2 CPU's speeds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The CPU features that decide which kernels oneDNN, fbgemm and ONNX Runtime run for the inference backends.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
_AVX2 = frozenset({"avx2"})
_AVX512 = _AVX2 | {"avx512f"}
_VNNI = _AVX512 | {"avx512_vnni"}
_BF16 = _VNNI | {"avx512_bf16"}
_ALL = frozenset(CPU_FEATURES)
# What each mask value leaves of CPU_FEATURES; a value not listed here is ignored, as the libraries ignore it.
ATEN_MASK = {"default": frozenset[str](), "avx2": _AVX2, "avx512": _ALL}
ONEDNN_MASK = {
    "sse41": frozenset[str](), "avx": frozenset[str](), "avx2": _AVX2, "avx2_vnni": _AVX2, "avx2_vnni_2": _AVX2,
    "avx512_core": _AVX512, "avx512_core_vnni": _VNNI, "avx512_core_bf16": _BF16, "avx10_1_512": _BF16,
    "avx512_core_fp16": _BF16, "avx512_core_amx": _ALL, "avx10_1_512_amx": _ALL, "avx10_1_512_amx_fp16": _ALL,
    "avx512_core_amx_fp16": _ALL, "all": _ALL,
}
MASK_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_model_and_flags(cpuinfo: Path = CPUINFO) -> tuple[str, frozenset[str]]:
    """The first CPU's model name and its flags in /proc/cpuinfo, unmasked; elsewhere (macOS, Windows, no
    such file) the architecture's name and no flags."""
    processor, flags = "unknown", frozenset[str]()
    try:
        text = cpuinfo.read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and processor == "unknown":
            processor = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:  # "Features" on ARM
            flags = frozenset(value.split())
    return processor, flags


def isa_mask(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The mask variables that are set (and understood), by name."""
    environ = os.environ if environ is None else environ
    masks = {name: environ[name] for name in MASK_VARIABLES if environ.get(name)}
    return {name: value for name, value in masks.items()
            if value.lower() in (ATEN_MASK if name == "ATEN_CPU_CAPABILITY" else ONEDNN_MASK)}


def masked_flags(flags: frozenset[str], environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """``flags`` without the features of CPU_FEATURES that the masks in ``environ`` (default: this
    process's) forbid; the other flags stay."""
    allowed = _ALL
    for name, value in isa_mask(environ).items():
        allowed &= (ATEN_MASK if name == "ATEN_CPU_CAPABILITY" else ONEDNN_MASK)[value.lower()]
    return frozenset(flag for flag in flags if flag not in _ALL or flag in allowed)


def cpu_features(cpuinfo: Path = CPUINFO, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Those of CPU_FEATURES this CPU has and the masks leave, in CPU_FEATURES' order."""
    flags = masked_flags(cpu_model_and_flags(cpuinfo)[1], environ)
    return tuple(name for name in CPU_FEATURES if name in flags)
