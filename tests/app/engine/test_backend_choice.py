"""app/engine/backend_choice.py: auto serves the fastest backend the checkpoint's own report verified within
APP_MAX_ACCURACY_DROP, the exact one without a valid report, an explicit setting as set; int8 calibrates on
the checkpoint's calibration set; and every swap decides again, for the new checkpoint."""

import logging
import shutil

import numpy as np
import pytest
import torch

from app.engine.backend_choice import BackendPolicy, plan_backend
from app.engine.engine import InferenceEngine
from app.engine.served_model import ServedModel
from model.backend_report import (
    BackendMeasurement,
    BackendReport,
    MachineIdentity,
    machine_identity,
    write_backend_report,
)
from model.calibration_set import save_calibration_set
from model.card import CALIBRATION_FILE, CheckpointError, file_sha256, read_card

pytestmark = pytest.mark.anyio

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only named: nothing here runs on it
MACHINE = MachineIdentity(device_type="cpu", processor="Example CPU", features=("avx2",), torch_version="2.14")
GPU = MachineIdentity(device_type="cuda", processor="Example GPU", features=("sm_90",), torch_version="2.14")


def row(backend: str, accuracy: float, speed: float) -> BackendMeasurement:
    return BackendMeasurement(backend=backend, accuracy=accuracy, agreement=0.99, max_probability_diff=0.01,
                              images_per_s={1: speed / 2, 16: speed, 64: speed * 1.2}, startup_s=0.1,
                              first_calls_s=0.1)


def measured(directory, *rows: BackendMeasurement, machine: MachineIdentity = MACHINE, sha: str | None = None,
             calibration_sha256: str | None = None) -> None:
    """Write a report for the checkpoint in ``directory`` (its own weights unless ``sha``)."""
    write_backend_report(BackendReport(
        weights_sha256=sha or read_card(directory).weights_sha256, architecture="resnet18", machine=machine,
        reference=rows[0].backend, test_images=10_000, backends=rows, calibration_sha256=calibration_sha256,
    ), directory)


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")


def with_calibration_set(directory) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    path = save_calibration_set(directory, pixels, weights_sha256=read_card(directory).weights_sha256,
                                source="test")
    return file_sha256(path)


# float32 at 91.00 %; bf16 0.10 points below it and int8 0.30 points below, each faster than the last.
CPU_ROWS = (row("eager", 0.9100, 100), row("fused", 0.9100, 110), row("bf16", 0.9090, 250),
            row("int8", 0.9070, 500))


def plan(checkpoint, device=CPU, machine=MACHINE, **policy):
    sha = read_card(checkpoint).weights_sha256
    return plan_backend(BackendPolicy(**policy), checkpoint, sha, device, machine=machine)


def test_auto_serves_the_fastest_backend_within_the_allowed_drop(checkpoint):
    measured(checkpoint, *CPU_ROWS)
    chosen = plan(checkpoint)
    assert chosen.backend == "bf16", "int8 is faster, but 0.3 points below float32"
    assert "backends-cpu.json" in chosen.reason and "90.90 % vs 91.00 %" in chosen.reason
    assert chosen.calibration is None
    assert chosen.verified_accuracy == 0.9090, "what the answers are worth: bf16's figure, not float32's"


def test_a_larger_allowed_drop_admits_int8_with_the_checkpoints_calibration_set(checkpoint):
    measured(checkpoint, *CPU_ROWS, calibration_sha256=with_calibration_set(checkpoint))
    chosen = plan(checkpoint, max_accuracy_drop=0.3)
    assert chosen.backend == "int8" and chosen.calibration is not None and chosen.calibration.shape == (8, 32, 32, 3)


def test_auto_passes_over_int8_without_the_calibration_set_it_was_verified_with(checkpoint):
    measured(checkpoint, *CPU_ROWS, calibration_sha256="c" * 64)
    missing = plan(checkpoint, max_accuracy_drop=0.3)
    assert missing.backend == "bf16" and "int8 is left out" in missing.reason and "no calibration set" in missing.reason
    with_calibration_set(checkpoint)  # a set, but not the one the report names
    other = plan(checkpoint, max_accuracy_drop=0.3)
    assert other.backend == "bf16" and "not the set the report measured int8 with" in other.reason


def test_without_a_report_auto_serves_the_exact_fused_and_says_so(checkpoint):
    chosen = plan(checkpoint)
    assert chosen.backend == "fused" and "no backend report" in chosen.reason
    assert chosen.verified_accuracy is None


def test_a_stale_or_foreign_report_is_refused(checkpoint):
    measured(checkpoint, *CPU_ROWS, sha="b" * 64)
    stale = plan(checkpoint)
    assert stale.backend == "fused" and "stale" in stale.reason
    measured(checkpoint, *CPU_ROWS)
    other = MachineIdentity(device_type="cpu", processor="Another CPU", features=("avx2",), torch_version="2.14")
    foreign = plan(checkpoint, machine=other)
    assert foreign.backend == "fused" and "another machine" in foreign.reason


def test_an_explicit_backend_serves_as_set_and_names_its_verified_accuracy(checkpoint):
    assert plan(checkpoint, cpu_backend="eager").reason == (
        "eager: set by APP_CPU_BACKEND; not verified for these weights on this machine")
    measured(checkpoint, *CPU_ROWS)
    chosen = plan(checkpoint, cpu_backend="fused")
    assert chosen.backend == "fused" and "verified test accuracy 91.00 %" in chosen.reason


def test_explicit_int8_prefers_the_checkpoints_set_then_the_data_dir_else_refuses(checkpoint, synthetic_cifar10):
    fallback = plan(checkpoint, cpu_backend="int8", data_dir=synthetic_cifar10)
    assert fallback.calibration is not None and "APP_DATA_DIR" in fallback.reason
    with pytest.raises(CheckpointError, match="APP_DATA_DIR"):
        plan(checkpoint, cpu_backend="int8", data_dir=checkpoint)  # no cifar-10-batches-py there
    with_calibration_set(checkpoint)
    saved = plan(checkpoint, cpu_backend="int8", data_dir=synthetic_cifar10)
    assert saved.calibration.shape == (8, 32, 32, 3) and CALIBRATION_FILE in saved.reason


def test_on_cuda_auto_weighs_bf16_autocast_against_fp32_by_the_cuda_report(checkpoint):
    assert plan(checkpoint, CUDA, GPU).backend == "fp32", "no backends-cuda.json: the exact precision"
    measured(checkpoint, row("fp32", 0.9100, 1000), row("bf16", 0.9095, 2500), machine=GPU)
    chosen = plan(checkpoint, CUDA, GPU)
    assert chosen.backend == "bf16" and "backends-cuda.json" in chosen.reason
    measured(checkpoint, row("fp32", 0.9100, 1000), row("bf16", 0.9050, 2500), machine=GPU)
    assert plan(checkpoint, CUDA, GPU).backend == "fp32", "bf16 0.5 points below float32"
    assert plan(checkpoint, CUDA, GPU, cuda_precision="bf16").backend == "bf16"
    assert plan(checkpoint, CUDA, GPU, cpu_backend="int8").backend == "fp32", "APP_CPU_BACKEND is the CPU's"


def test_an_auto_choice_that_cannot_be_prepared_falls_back_to_fused_and_an_explicit_one_fails(checkpoint,
                                                                                            monkeypatch):
    import app.engine.served_model as served_model

    measured(checkpoint, *CPU_ROWS, machine=machine_identity(CPU))
    prepare = served_model.prepare_for_inference

    def without_bf16(model, device, backend, *args, **kwargs):
        if backend == "bf16":
            raise RuntimeError("no bf16 kernels here")
        return prepare(model, device, backend, *args, **kwargs)

    monkeypatch.setattr(served_model, "prepare_for_inference", without_bf16)
    served = ServedModel.load(checkpoint, CPU)
    assert served.backend == "fused"
    assert "auto chose bf16, which failed to prepare (RuntimeError: no bf16 kernels here)" in served.backend_reason
    with pytest.raises(RuntimeError, match="no bf16 kernels"):
        ServedModel.load(checkpoint, CPU, BackendPolicy(cpu_backend="bf16"))


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_every_swap_chooses_again_from_the_new_checkpoints_own_report(checkpoint, tmp_path, tiny_checkpoint):
    measured(checkpoint, *CPU_ROWS, machine=machine_identity(CPU))
    engine = InferenceEngine(CPU, max_batch_size=4, max_batch_delay_s=0.001, max_queue=16)
    log, recorded = logging.getLogger("app.engine.engine"), Recorded()
    log.addHandler(recorded)
    previous_level = log.level
    log.setLevel(logging.INFO)
    await engine.start()
    try:
        await engine.swap(checkpoint)
        assert engine.model.backend == "bf16" and engine.model.dtype == "bfloat16"
        await engine.swap(tiny_checkpoint)  # the same weights, but no report next to them
        assert engine.model.backend == "fused" and "no backend report" in engine.model.backend_reason
    finally:
        await engine.stop(timeout=30)
        log.removeHandler(recorded)
        log.setLevel(previous_level)
    swapped = [message for message in recorded.messages if message.startswith("model swapped in")]
    # Ranked at the engine's largest batch, 4, so by the largest measured batch below it, 1.
    assert swapped[0].startswith("model swapped in, serving on bf16: the fastest at batch 1 ")
    assert swapped[1].startswith("model swapped in, serving on fused, the exact float32 backend: no backend report")
