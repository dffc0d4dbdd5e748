"""The CPU features the kernels may use: the CPU's flags, capped by the masks that PyTorch and oneDNN honour."""

from pathlib import Path

import pytest

from model.cpu_features import cpu_features, cpu_model_and_flags, isa_mask, masked_flags

ZEN4 = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 fma avx2 avx512f avx512_vnni "
        "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
SAPPHIRE_RAPIDS = ZEN4.replace("avx512_bf16", "avx512_bf16 amx_tile amx_bf16 amx_int8")
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16 i8mm\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_the_first_cpus_name_and_flags_are_read(tmp_path):
    processor, flags = cpu_model_and_flags(_cpuinfo(tmp_path, ZEN4))
    assert processor == "AMD EPYC 9R14"
    assert {"avx2", "avx512_bf16", "fpu"} <= flags


def test_an_arm_cpu_has_its_features_and_none_of_the_x86_ones(tmp_path):
    processor, flags = cpu_model_and_flags(_cpuinfo(tmp_path, GRAVITON))
    assert "sve" in flags
    assert cpu_features(_cpuinfo(tmp_path, GRAVITON), environ={}) == ()


@pytest.mark.parametrize("environ, expected", [
    ({}, ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, ("avx2",)),
    ({"ATEN_CPU_CAPABILITY": "default"}, ()),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ("avx2",)),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, ("avx2", "avx512f")),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, ("avx2", "avx512f", "avx512_vnni")),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")),
    # Each mask caps what the other allows: the lower one wins.
    ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX2"}, ("avx2",)),
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "ALL"}, ("avx2",)),
])
def test_the_masks_cap_the_features(tmp_path, environ, expected):
    assert cpu_features(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS), environ=environ) == expected


def test_a_value_the_libraries_ignore_is_ignored_and_no_mask_adds_a_feature(tmp_path):
    assert isa_mask({"ONEDNN_MAX_CPU_ISA": "AVX9000", "ATEN_CPU_CAPABILITY": ""}) == {}
    assert cpu_features(_cpuinfo(tmp_path, ZEN4), environ={"ONEDNN_MAX_CPU_ISA": "AVX9000"}) == \
        ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
    assert cpu_features(_cpuinfo(tmp_path, ZEN4), environ={"ONEDNN_MAX_CPU_ISA": "ALL"}) == \
        ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")


def test_flags_outside_the_listed_features_pass_through_the_mask():
    assert masked_flags(frozenset({"fpu", "sse2", "avx512f"}), {"ATEN_CPU_CAPABILITY": "avx2"}) == {"fpu", "sse2"}


def test_without_cpuinfo_the_architecture_is_named_and_no_feature_is_claimed(tmp_path):
    processor, flags = cpu_model_and_flags(tmp_path / "absent")
    assert processor and flags == frozenset()
