"""model/backend_report.py: a report holds only for its weights on its kind of machine, and the choice rule
serves the fastest backend that keeps the accuracy, else the exact one."""

import json

import pytest

from model.backend_report import (
    BackendMeasurement,
    BackendReport,
    BackendReportError,
    BackendReportMissing,
    MachineIdentity,
    choose_backend,
    load_backend_report,
    machine_identity,
    read_backend_report,
    report_file,
    write_backend_report,
)

SHA = "a" * 64
OTHER_SHA = "b" * 64
MACHINE = MachineIdentity(device_type="cpu", processor="Example CPU", features=("avx2", "avx512f"),
                          torch_version="2.14")


def row(backend: str, accuracy: float, speed_at_16: float, **speeds: float) -> BackendMeasurement:
    images_per_s = {1: speeds.get("b1", speed_at_16 / 2), 16: speed_at_16, 64: speeds.get("b64", speed_at_16)}
    return BackendMeasurement(backend=backend, accuracy=accuracy, agreement=0.99, max_probability_diff=0.01,
                              images_per_s=images_per_s, startup_s=0.5, first_calls_s=0.1)


def report(*rows: BackendMeasurement, sha: str = SHA, machine: MachineIdentity = MACHINE) -> BackendReport:
    return BackendReport(weights_sha256=sha, architecture="fastcnn", machine=machine, reference="eager",
                         test_images=10_000, backends=rows)


# Accuracies on 10,000 images: bf16 is 0.1 points below float32, int8 0.3 points.
MEASURED = report(row("eager", 0.9100, 100), row("fused", 0.9100, 110), row("onnx", 0.9100, 150),
                  row("bf16", 0.9090, 250), row("int8", 0.9070, 500))


def test_the_fastest_backend_within_the_drop_is_chosen():
    choice = choose_backend(MEASURED, max_drop_points=0.2)
    assert choice.backend == "bf16", "int8 is faster but 0.3 points below float32"
    assert "bf16" in choice.reason and "90.90 %" in choice.reason and "91.00 %" in choice.reason


def test_a_larger_allowed_drop_admits_int8():
    assert choose_backend(MEASURED, max_drop_points=0.3).backend == "int8"


def test_a_drop_of_zero_still_allows_the_exact_backends():
    assert choose_backend(MEASURED, max_drop_points=0).backend == "onnx"


def test_backends_that_cannot_run_here_are_passed_over():
    choice = choose_backend(MEASURED, available={"eager", "fused", "int8"})
    assert choice.backend == "fused"


def test_the_ranking_uses_the_named_batch_size():
    measured = report(row("eager", 0.91, 100), row("fused", 0.91, 110, b1=90), row("onnx", 0.91, 105, b1=200))
    assert choose_backend(measured, batch_size=16).backend == "fused"
    assert choose_backend(measured, batch_size=1).backend == "onnx"
    assert choose_backend(measured, batch_size=32).backend == "fused", "ranked at 16, the largest below 32"
    assert "at batch 16" in choose_backend(measured, batch_size=32).reason


def test_without_a_report_the_exact_backend_serves():
    assert choose_backend(None).backend == "fused"
    assert choose_backend(None, device_type="cuda").backend == "fp32"
    assert "no verified" in choose_backend(None).reason


def test_a_report_round_trips_for_its_own_weights_and_machine(tmp_path):
    path = write_backend_report(MEASURED, tmp_path)
    assert path.name == report_file("cpu") == "backends-cpu.json"
    assert load_backend_report(tmp_path, weights_sha256=SHA, machine=MACHINE) == MEASURED


def test_a_stale_report_is_refused(tmp_path):
    write_backend_report(MEASURED, tmp_path)
    with pytest.raises(BackendReportError, match="stale") as error:
        load_backend_report(tmp_path, weights_sha256=OTHER_SHA, machine=MACHINE)
    assert "python -m training.verify_backends" in str(error.value)


def test_a_report_from_another_machine_is_refused(tmp_path):
    write_backend_report(MEASURED, tmp_path)
    without_vnni = MACHINE.model_copy(update={"features": ("avx2",)})
    with pytest.raises(BackendReportError, match="another machine.*features"):
        load_backend_report(tmp_path, weights_sha256=SHA, machine=without_vnni)
    newer_torch = MACHINE.model_copy(update={"torch_version": "2.15"})
    with pytest.raises(BackendReportError, match="torch_version"):
        load_backend_report(tmp_path, weights_sha256=SHA, machine=newer_torch)


def test_a_missing_report_is_its_own_error(tmp_path):
    with pytest.raises(BackendReportMissing):
        load_backend_report(tmp_path, weights_sha256=SHA, machine=MACHINE)


def test_a_corrupt_or_inconsistent_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / report_file("cpu")
    path.write_text("{not json")
    with pytest.raises(BackendReportError, match="not a valid backend report.*verify_backends"):
        read_backend_report(path)
    content = json.loads(MEASURED.model_dump_json())
    content["reference"] = "fp32"  # not among the rows
    path.write_text(json.dumps(content))
    with pytest.raises(BackendReportError, match="reference"):
        read_backend_report(path)


def test_this_machine_is_described_by_what_its_figures_depend_on():
    machine = machine_identity("cpu")
    assert machine.device_type == "cpu" and machine.processor
    assert machine.torch_version.count(".") == 1
    assert machine == machine_identity("cpu"), "the same machine, the same identity"


@pytest.mark.isa
def test_the_identity_names_the_features_the_kernels_may_use_under_the_isa_masks(monkeypatch):
    """Under PyTorch's and oneDNN's AVX2 masks an AVX-512 machine runs an AVX2 machine's kernels, and its
    identity says so: a report measured without the mask is foreign there."""
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    native = machine_identity("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    masked = machine_identity("cpu")
    assert set(masked.features) <= {"avx2"}
    assert set(masked.features) <= set(native.features)
    assert (masked == native) == (set(native.features) <= {"avx2"})
