"""Which backend serves a checkpoint, and why: decided again for every checkpoint the engine loads.

``APP_CPU_BACKEND`` (on the CPU) and ``APP_CUDA_PRECISION`` (on CUDA) are ``auto`` by default: the fastest
backend whose test accuracy, as ``python -m training.verify_backends`` measured it for *these* weights on
*this kind of* machine (``backends-cpu.json`` / ``backends-cuda.json`` next to the weights), is within
``APP_MAX_ACCURACY_DROP`` points of float32's (``model.backend_report.choose_backend``). Without a valid
report (none, stale weights, another machine) the CPU looks for the report the service measured itself on
this machine (``app.engine.self_verification``, kept in ``APP_STATE_DIR``: ``app.engine.report_cache``);
without either the exact backend serves: ``fused`` on the CPU, float32 on CUDA. An explicit setting serves
that backend, and the reason names its verified accuracy when a report has it.

int8 calibrates on the checkpoint's own ``calibration.safetensors``, the images the report's int8 row was
measured with. ``auto`` picks int8 only with that file (same SHA-256 as the report names); else it picks
among the others. An explicit ``int8`` without a usable file falls back to the first training images in
``APP_DATA_DIR`` (``app.engine.calibration``), as before the file existed, and says so in the reason;
without those either, the checkpoint is refused with a message naming both fixes.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from app.engine.calibration import CalibrationUnavailable, calibration_pixels
from app.engine.report_cache import load_cached_report
from model.backend_report import (
    CUDA_PRECISIONS,
    DEFAULT_MAX_DROP_POINTS,
    DEFAULT_RANKING_BATCH,
    EXACT_BACKEND,
    BackendChoice,
    BackendReport,
    BackendReportError,
    BackendReportMissing,
    MachineIdentity,
    choose_backend,
    load_backend_report,
    machine_identity,
    report_file,
)
from model.calibration_set import CalibrationSetError, load_calibration_set
from model.card import CALIBRATION_FILE, CheckpointError, file_sha256
from model.inference import BACKENDS, available_cpu_backends

AUTO = "auto"
CPU_BACKEND_SETTINGS = (AUTO, *BACKENDS)
CUDA_PRECISION_SETTINGS = (AUTO, *CUDA_PRECISIONS)
_SETTING = {"cpu": "APP_CPU_BACKEND", "cuda": "APP_CUDA_PRECISION"}


@dataclass(frozen=True)
class BackendPolicy:
    """The settings the choice follows (app/config.py documents each)."""

    cpu_backend: str = AUTO
    cuda_precision: str = AUTO
    max_accuracy_drop: float = DEFAULT_MAX_DROP_POINTS  # percentage points below float32's test accuracy
    data_dir: Path | None = None  # explicit int8's fallback calibration images (APP_DATA_DIR)
    report_cache: Path | None = None  # the reports the service measured itself (APP_STATE_DIR/backend-reports)

    def setting(self, device_type: str) -> str:
        return self.cuda_precision if device_type == "cuda" else self.cpu_backend


DEFAULT_POLICY = BackendPolicy()  # auto on both devices, within 0.2 points


@dataclass(frozen=True)
class BackendPlan:
    backend: str  # a model.inference backend on the CPU; fp32 or bf16 on CUDA
    reason: str  # one sentence for GET /model and the log
    calibration: np.ndarray | None = None  # uint8 NHWC training images, int8 only
    verified_accuracy: float | None = None  # this backend's test accuracy in the checkpoint's report, if any
    report: BackendReport | None = None  # the report the choice followed, if one held


def plan_backend(policy: BackendPolicy, checkpoint_dir: Path, weights_sha256: str, device: torch.device, *,
                 ranking_batch: int = DEFAULT_RANKING_BATCH, machine: MachineIdentity | None = None) -> BackendPlan:
    """The backend that serves the checkpoint in ``checkpoint_dir`` on ``device``. ``ranking_batch``: the
    engine's largest batch, the size that speeds are compared at. ``machine``: this machine's identity
    (computed when not given; tests pass one)."""
    device_type = "cuda" if device.type == "cuda" else "cpu"
    setting = policy.setting(device_type)
    machine = machine or _this_machine(device)
    report, problem = _verified_report(checkpoint_dir, weights_sha256, machine)
    if report is None and device_type == "cpu" and policy.report_cache is not None:
        report = load_cached_report(policy.report_cache, weights_sha256, machine)
    plan = _plan(policy, setting, device_type, checkpoint_dir, weights_sha256, report, problem, ranking_batch)
    measured = None if report is None or report.image_set != "test" else report.measurement(plan.backend)
    return replace(plan, verified_accuracy=None if measured is None else measured.accuracy, report=report)


def _plan(policy: BackendPolicy, setting: str, device_type: str, checkpoint_dir: Path, weights_sha256: str,
          report: BackendReport | None, problem: str, ranking_batch: int) -> BackendPlan:
    if setting != AUTO:
        return _explicit(setting, device_type, policy, checkpoint_dir, weights_sha256, report)
    if report is None:
        exact = EXACT_BACKEND[device_type]
        return BackendPlan(exact, f"{exact}, the exact float32 backend: {problem}")
    available = set(CUDA_PRECISIONS) if device_type == "cuda" else set(available_cpu_backends()[0])
    choice = _choose(report, device_type, policy, ranking_batch, available)
    if choice.backend != "int8":
        return BackendPlan(choice.backend, choice.reason)
    try:
        calibration = _verified_calibration(checkpoint_dir, weights_sha256, report)
    except CalibrationSetError as error:
        again = _choose(report, device_type, policy, ranking_batch, available - {"int8"})
        return BackendPlan(again.backend, f"{again.reason}; int8 is left out: {error}")
    return BackendPlan("int8", choice.reason, calibration)


def _choose(report: BackendReport, device_type: str, policy: BackendPolicy, ranking_batch: int,
            available: Collection[str]) -> BackendChoice:
    return choose_backend(report, device_type=device_type, max_drop_points=policy.max_accuracy_drop,
                          batch_size=ranking_batch, available=available, source=report_source(report))


def report_source(report: BackendReport) -> str:
    """How a reason names the report: the checkpoint's file, or the service's own measurement."""
    if report.image_set == "verification":
        return "the service's own verification on this machine"
    return report_file(report.machine.device_type)


def _verified_report(checkpoint_dir: Path, weights_sha256: str,
                     machine: MachineIdentity) -> tuple[BackendReport | None, str]:
    """The checkpoint's report if it holds for these weights on this machine, else why not."""
    try:
        return load_backend_report(checkpoint_dir, weights_sha256=weights_sha256, machine=machine), ""
    except BackendReportMissing:
        return None, (f"no backend report ({report_file(machine.device_type)} next to the weights; write it with "
                      f"`python -m training.verify_backends --weights {checkpoint_dir} --data-dir DATA`)")
    except BackendReportError as error:
        return None, str(error)


def _explicit(backend: str, device_type: str, policy: BackendPolicy, checkpoint_dir: Path, weights_sha256: str,
              report: BackendReport | None) -> BackendPlan:
    reason = f"{backend}: set by {_SETTING[device_type]}"
    row = report.measurement(backend) if report is not None else None
    if report is not None and row is not None:
        reason += (f"; verified {report.image_set} accuracy {100 * row.accuracy:.2f} % against float32's "
                   f"{100 * report.reference_measurement.accuracy:.2f} % by {report_source(report)}")
    else:
        reason += "; not verified for these weights on this machine"
    if backend != "int8" or device_type != "cpu":
        return BackendPlan(backend, reason)
    try:
        return BackendPlan(backend, f"{reason}; calibrated on {CALIBRATION_FILE}",
                           load_calibration_set(checkpoint_dir, weights_sha256))
    except CalibrationSetError as saved_error:
        if policy.data_dir is None:
            raise CheckpointError(f"APP_CPU_BACKEND=int8 needs calibration images: {saved_error}") from None
        try:
            pixels = calibration_pixels(policy.data_dir)
        except CalibrationUnavailable as data_error:
            raise CheckpointError(f"APP_CPU_BACKEND=int8 needs calibration images, and found none: "
                                  f"{saved_error}; and {data_error}") from None
        return BackendPlan(backend, f"{reason}; calibrated on the first {len(pixels)} training images in "
                                    f"APP_DATA_DIR, since the checkpoint has no usable {CALIBRATION_FILE}", pixels)


def _verified_calibration(checkpoint_dir: Path, weights_sha256: str, report: BackendReport) -> np.ndarray:
    """The calibration set the report's int8 row was measured with, or ``CalibrationSetError``."""
    pixels = load_calibration_set(checkpoint_dir, weights_sha256)
    if report.calibration_sha256 != file_sha256(checkpoint_dir / CALIBRATION_FILE):
        raise CalibrationSetError(f"{CALIBRATION_FILE} is not the set the report measured int8 with; measure "
                                  "again with `python -m training.verify_backends`")
    return pixels


@functools.cache
def _this_machine(device: torch.device) -> MachineIdentity:
    return machine_identity(device)
