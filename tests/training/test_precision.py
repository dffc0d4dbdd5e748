"""Which precision a run trains in: detected from the CPU's flags, overridable, and really applied."""

from pathlib import Path

import pytest
import torch

from training.precision import autocast_for, cpu_has_native_bf16, resolve_precision

CPU = torch.device("cpu")
# /proc/cpuinfo as Linux writes it, trimmed to what the detection reads.
WITHOUT_BF16 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
WITH_AVX512_BF16 = WITHOUT_BF16.replace("avx512_vnni", "avx512_vnni avx512_bf16")
WITH_AMX = WITHOUT_BF16.replace("avx512_vnni", "amx_tile amx_bf16 amx_int8")


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [(WITHOUT_BF16, "fp32"), (WITH_AVX512_BF16, "bf16"),
                                            (WITH_AMX, "bf16")])
def test_auto_uses_bf16_only_where_the_cpu_computes_it_natively(tmp_path, text, expected):
    cpuinfo = _cpuinfo(tmp_path, text)
    assert resolve_precision("auto", CPU, cpuinfo, environ={}) == expected
    assert cpu_has_native_bf16(cpuinfo, environ={}) == (expected == "bf16")


@pytest.mark.parametrize("mask, expected", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "fp32"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "fp32"),
    ({"DNNL_MAX_CPU_ISA": "avx512_core_vnni"}, "fp32"),  # oneDNN's older name, any case
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "bf16"),
    ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL"}, "bf16"),
    ({"ONEDNN_MAX_CPU_ISA": "NOT_AN_ISA"}, "bf16"),  # oneDNN ignores a value it does not know, and so do we
])
def test_auto_follows_the_isa_masks_the_kernels_follow(tmp_path, mask, expected):
    # Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN emulates bf16, as on an AVX2-only CPU: auto must then train float32.
    cpuinfo = _cpuinfo(tmp_path, WITH_AVX512_BF16)
    assert resolve_precision("auto", CPU, cpuinfo, environ=mask) == expected


def test_a_missing_cpuinfo_means_no_native_bf16(tmp_path):
    assert resolve_precision("auto", CPU, tmp_path / "absent", environ={}) == "fp32"


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_an_explicit_choice_overrides_detection(tmp_path, choice):
    for text in (WITHOUT_BF16, WITH_AVX512_BF16):
        masked = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
        assert resolve_precision(choice, CPU, _cpuinfo(tmp_path, text), environ=masked) == choice


def test_auto_is_bf16_on_cuda_whatever_the_host_cpu(tmp_path):
    assert resolve_precision("auto", torch.device("cuda", 0), _cpuinfo(tmp_path, WITHOUT_BF16)) == "bf16"


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_computes_convolutions_in_the_resolved_precision(precision, dtype):
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast_for(CPU, precision)():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == dtype
