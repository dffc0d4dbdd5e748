"""Which inference backends keep a checkpoint's accuracy on this machine, and how fast each is.

``python -m training.verify_backends`` (and the end of a training run) measures every backend available on
a machine against a checkpoint, on the whole test set, and writes the result next to the weights as
``backends-cpu.json`` or ``backends-cuda.json``: per backend its test accuracy, top-1 agreement with the
float32 model, the largest softmax-probability difference from it, images/s at a few batch sizes, and
start-up time. This module is the file's one definition: its schema, writing and reading it, and
``choose_backend``, the pure rule a service applies to it.

A report holds for one set of weights on one kind of machine: the accuracy of ``bf16`` and ``int8`` depends
on the kernels the CPU's instruction sets select, and every speed on the CPU itself. So it names the
weights' SHA-256 and the machine (``MachineIdentity``), and ``load_backend_report`` refuses a file whose
weights or machine differ from the ones at hand: such a file is stale or foreign, and a service falls back
to the exact backend (``choose_backend(None)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.cpu_features import CPU_FEATURES, cpu_features, cpu_model_and_flags
from model.durable import write_atomically

if TYPE_CHECKING:
    import torch

__all__ = ["CPU_FEATURES"]  # re-exported: a report's machine names those of them the CPU has

FORMAT_VERSION: Literal[1] = 1
BATCH_SIZES = (1, 16, 64)
# APP_MAX_ACCURACY_DROP's default (issue 11): 0.2 points is 20 of the 10,000 test images.
DEFAULT_MAX_DROP_POINTS = 0.2
# Backends are ranked by their speed at this batch size: the CPU engine's automatic largest batch.
DEFAULT_RANKING_BATCH = 16
# What each device's rows are called. On the CPU they are model.inference's backends, "eager" (the model as
# trained, float32) being the reference; on CUDA the engine's two precisions, float32 and bf16 autocast.
REFERENCE_BACKEND = {"cpu": "eager", "cuda": "fp32"}
EXACT_BACKEND = {"cpu": "fused", "cuda": "fp32"}  # what serves without a valid report: float32's own answers
CUDA_PRECISIONS = ("fp32", "bf16")
# A difference this small between two accuracies is float rounding, not a dropped image (1e-4 of one).
_ROUNDING = 1e-8


def report_file(device_type: str) -> str:
    return f"backends-{device_type}.json"


class BackendReportError(ValueError):
    """A report that cannot be used for these weights on this machine; the message says why and what to do."""


class BackendReportMissing(BackendReportError):
    """No report next to the checkpoint."""


class MachineIdentity(BaseModel):
    """What a report's figures depend on; two machines with the same identity give the same accuracies
    and comparable speeds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_type: Literal["cpu", "cuda"]
    processor: str = Field(description="the CPU's model name, or the GPU's name")
    features: tuple[str, ...] = Field(description="CPU: those of CPU_FEATURES it has, less what "
                                                  "ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA mask; CUDA: its "
                                                  "compute capability, e.g. sm_90")
    torch_version: str = Field(description="major.minor: a new torch may choose other kernels")


def machine_identity(device: str | torch.device = "cpu") -> MachineIdentity:
    # torch is imported where it is asked about the machine, not at the top: the report's schema, its file name
    # and choose_backend's defaults are read without it (app.config, the control plane's registry).
    import torch

    device = torch.device(device)
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return MachineIdentity(device_type="cuda", processor=torch.cuda.get_device_name(device),
                               features=(f"sm_{major}{minor}",), torch_version=torch_version)
    # The features as the kernels see them: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA mask them
    # (model.cpu_features), so an AVX-512 machine under an AVX2 mask has an AVX2 machine's identity.
    return MachineIdentity(device_type="cpu", processor=cpu_model_and_flags()[0], features=cpu_features(),
                           torch_version=torch_version)


class BackendMeasurement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str
    accuracy: float = Field(ge=0, le=1, description="top-1 on the test set, 0..1")
    agreement: float = Field(ge=0, le=1, description="share of test images whose top-1 class is the reference's")
    max_probability_diff: float = Field(ge=0, description="largest |p - p_reference| over all images and classes")
    max_logit_diff: float | None = Field(default=None, ge=0, description="largest |logit - logit_reference| over "
                                         "all images and classes; bounds the OOD score's difference (reports "
                                         "written before it was measured lack it)")
    images_per_s: dict[int, float] = Field(description="batch size -> images/s (median of the rounds)")
    startup_s: float = Field(ge=0, description="preparing the backend: folding, export, calibration")
    first_calls_s: float = Field(ge=0, description="the first forward pass at each batch size after that")


class BackendReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: str
    machine: MachineIdentity
    reference: str = Field(description="the float32 row every agreement and difference is measured against")
    image_set: Literal["test", "verification"] = Field(
        default="test", description="what the accuracies were measured on: the whole test set "
        "(training.verify_backends), or the checkpoint's verification set (the service's own measurement)")
    test_images: int = Field(ge=1, description="how many images of image_set were measured")
    calibration_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                           description="SHA-256 of the calibration.safetensors int8 used")
    calibration_images: int | None = None
    settings: dict[str, Any] = Field(default_factory=dict, description="threads, passes, rounds, seconds")
    conditions: dict[str, Any] = Field(default_factory=dict, description="load average, cores, versions")
    measured_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    backends: tuple[BackendMeasurement, ...]
    skipped: dict[str, str] = Field(default_factory=dict, description="backend -> why it was not measured")

    @model_validator(mode="after")
    def _consistent(self) -> BackendReport:
        names = [row.backend for row in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backends are listed more than once: {names}")
        if self.reference not in names:
            raise ValueError(f"the reference {self.reference!r} is not among the backends {names}")
        sizes = {tuple(sorted(row.images_per_s)) for row in self.backends}
        if len(sizes) != 1:
            raise ValueError(f"every backend must be timed at the same batch sizes, got {sorted(sizes)}")
        return self

    def measurement(self, backend: str) -> BackendMeasurement | None:
        return next((row for row in self.backends if row.backend == backend), None)

    @property
    def reference_measurement(self) -> BackendMeasurement:
        row = self.measurement(self.reference)
        assert row is not None  # checked by _consistent
        return row


def library_versions() -> dict[str, str]:
    """The versions of the libraries whose kernels the backends run: a new one may choose other kernels."""
    import torch  # as in machine_identity: only where the backends are measured

    versions: dict[str, str] = {"torch": torch.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def write_backend_report(report: BackendReport, directory: str | os.PathLike[str]) -> Path:
    """Write ``report`` into the checkpoint ``directory``, atomically; returns the file's path."""
    path = Path(directory) / report_file(report.machine.device_type)
    write_atomically(path, report.model_dump_json(indent=2) + "\n")
    return path


def read_backend_report(path: str | os.PathLike[str]) -> BackendReport:
    """The report in the file ``path``, checked against the schema only."""
    path = Path(path)
    if not path.is_file():
        raise BackendReportMissing(f"no backend report at {path}")
    try:
        return BackendReport.model_validate(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as error:
        raise BackendReportError(f"{path} is not a valid backend report ({error}); write it again with "
                                 "`python -m training.verify_backends`") from None


def load_backend_report(directory: str | os.PathLike[str], *, weights_sha256: str,
                        machine: MachineIdentity) -> BackendReport:
    """The report next to the checkpoint in ``directory``, if it was measured for exactly these weights
    on a machine like this one; else ``BackendReportError`` (``BackendReportMissing`` without a file)."""
    path = Path(directory) / report_file(machine.device_type)
    again = f"measure again with `python -m training.verify_backends --weights {Path(directory)} --data-dir DATA`"
    report = read_backend_report(path)
    if report.weights_sha256 != weights_sha256:
        raise BackendReportError(f"{path} was measured for weights {report.weights_sha256[:12]}, these are "
                                 f"{weights_sha256[:12]}: it is stale; {again}")
    if report.machine != machine:
        differences = ", ".join(f"{name} {getattr(report.machine, name)!r} there, {getattr(machine, name)!r} here"
                                for name in MachineIdentity.model_fields
                                if getattr(report.machine, name) != getattr(machine, name))
        raise BackendReportError(f"{path} was measured on another machine ({differences}); {again} on this one")
    return report


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str  # one sentence for /model and the start-up log


def choose_backend(
    report: BackendReport | None,
    *,
    device_type: str = "cpu",
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS,
    batch_size: int = DEFAULT_RANKING_BATCH,
    available: Collection[str] | None = None,
    source: str | None = None,
) -> BackendChoice:
    """The fastest backend at ``batch_size`` whose verified test accuracy is at most ``max_drop_points``
    percentage points below the float32 reference's; without a report, the exact backend.

    ``batch_size`` not among the measured ones ranks by the largest measured one below it (or the smallest
    of all). ``available``: the backends this process can run (say, without ONNX Runtime installed);
    others are passed over. The reference itself always qualifies, so a report yields a measured backend.
    ``source``: how the reason names the report (default: its file name).
    """
    exact = EXACT_BACKEND[device_type]
    if report is None:
        return BackendChoice(exact, f"{exact}: no verified backend report for these weights on this machine, so "
                                    "the exact float32 backend")
    reference = report.reference_measurement
    measured = sorted(reference.images_per_s)
    batch_size = max((size for size in measured if size <= batch_size), default=measured[0])
    floor = reference.accuracy - max_drop_points / 100
    candidates = [row for row in report.backends
                  if (available is None or row.backend in available) and row.accuracy >= floor - _ROUNDING]
    if not candidates:
        return BackendChoice(exact, f"{exact}: none of the verified backends can run here")
    best = max(candidates, key=lambda row: row.images_per_s[batch_size])
    return BackendChoice(
        best.backend,
        f"{best.backend}: the fastest at batch {batch_size} ({best.images_per_s[batch_size]:.0f} images/s, float32 "
        f"{reference.images_per_s[batch_size]:.0f}) within {max_drop_points:g} points of float32 by "
        f"{source or report_file(device_type)} ({report.image_set} accuracy {100 * best.accuracy:.2f} % vs "
        f"{100 * reference.accuracy:.2f} % on {report.test_images} images)",
    )
