"""app/engine/self_verification.py: the service measures its CPU backends on this machine in a child process,
on the checkpoint's verification set, keeps the report in the state folder, swaps the winner in, reuses the
report after a restart, measures again on another machine identity (an ISA mask), and measures nothing when
APP_CPU_BACKEND pins a backend, when the checkpoint's own report holds here, or without a verification set."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from app.engine.backend_choice import BackendPolicy
from app.engine.engine import InferenceEngine
from app.engine.report_cache import CACHE_FOLDER, cached_report_path
from app.engine.self_verification import BackendVerification
from app.engine.verification_child import NICENESS
from model.backend_report import (
    BackendMeasurement,
    BackendReport,
    library_versions,
    machine_identity,
    write_backend_report,
)
from model.calibration_set import save_calibration_set, save_verification_set
from model.card import CALIBRATION_FILE, VERIFICATION_FILE, file_sha256, read_card
from tests.support.checkpoints import make_checkpoint
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

CPU = torch.device("cpu")
IMAGES = 48  # a small labelled set: the test checks the mechanism, not the figures
PHASE_TIMEOUT_S = 300.0  # the child imports torch, exports ONNX and times five backends on 2 busy cores
ISA_MASKS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@pytest.fixture
def checkpoint(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("fastcnn") / "checkpoint", architecture="fastcnn")
    sha = read_card(directory).weights_sha256
    rng = np.random.default_rng(0)
    save_calibration_set(directory, rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), weights_sha256=sha,
                         source="test")
    save_verification_set(directory, rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8),
                          rng.integers(0, 10, IMAGES), weights_sha256=sha, source="test")
    return directory


@pytest.fixture
def unmasked(monkeypatch):
    for name in ISA_MASKS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class Service:
    """An engine with its self-verification, as the app's lifespan wires them."""

    def __init__(self, state_dir, **verification) -> None:
        self.engine = InferenceEngine(CPU, max_batch_size=4, max_batch_delay_s=0.001, max_queue=16,
                                      backend_policy=BackendPolicy(max_accuracy_drop=100.0))
        self.verification = BackendVerification(self.engine, state_dir / CACHE_FOLDER, poll_s=0.05,
                                                seconds_per_timing=0.05, rounds=1, **verification)

    async def __aenter__(self):
        await self.engine.start()
        self.verification.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.verification.close()
        await self.engine.stop(timeout=30)

    async def until(self, *phases: str) -> None:
        async def reached() -> bool:
            return self.verification.status.phase in phases
        await eventually(reached, PHASE_TIMEOUT_S, f"the phase {' or '.join(phases)}", every_s=0.05)


async def test_it_measures_in_a_child_caches_the_report_and_serves_the_winner(checkpoint, tmp_path, unmasked):
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint, origin="test")
        assert service.engine.model.backend == "fused"  # no report holds yet: the exact backend serves at once
        assert service.verification.status.phase == "verifying"
        await service.until("verified", "kept_reference")
        status = service.verification.status
        assert status.phase == "verified", status.summary
        assert status.source == "measured" and status.image_set == "verification" and status.images == IMAGES
        rows = {row.backend: row for row in status.backends}
        assert {"eager", "fused", "bf16", "int8"} <= set(rows)
        assert rows["eager"].agreement == 1.0 and rows["eager"].max_logit_diff == 0.0
        assert rows["fused"].max_logit_diff < 1e-3, "fused is exact float32"
        # With any drop allowed, the winner is the fastest at the engine's largest batch, 4.
        fastest = max(rows.values(), key=lambda row: row.images_per_s[4]).backend
        assert status.chosen == fastest

        async def winner_served() -> bool:
            return service.engine.model.backend == fastest
        await eventually(winner_served, 60, f"{fastest} to serve", every_s=0.05)
        assert "the service's own verification on this machine" in service.engine.model.backend_reason or \
            fastest == "fused"
    report = BackendReport.model_validate_json(
        cached_report_path(tmp_path / CACHE_FOLDER, read_card(checkpoint).weights_sha256,
                           machine_identity("cpu")).read_text())
    assert report.image_set == "verification" and report.machine == machine_identity("cpu")

    # A restart on the same machine serves the winner from its first model on, and measures nothing.
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint, origin="test")
        assert service.engine.model.backend == fastest
        status = service.verification.status
        assert (status.phase, status.source, status.chosen) == ("verified", "cache", fastest)


async def test_another_machine_identity_measures_again(checkpoint, tmp_path, unmasked):
    """The AVX2 mask gives this machine an AVX2 machine's identity (model.cpu_features): the report cached
    without it does not hold there."""
    cache = tmp_path / CACHE_FOLDER
    native = machine_identity("cpu")
    sha = read_card(checkpoint).weights_sha256
    report = _report(sha, native)
    cache.mkdir()
    cached_report_path(cache, sha, native).write_text(report.model_dump_json())
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint)
        assert service.verification.status.source == "cache"
    unmasked.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    if machine_identity("cpu") == native:
        pytest.skip("this CPU has no feature above AVX2 to mask")
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint)
        assert service.verification.status.phase == "verifying"
        assert service.verification.status.isa_mask == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
        assert service.verification.status.features == ["avx2"]


async def test_the_checkpoints_own_report_is_used_where_the_machine_is_the_same(checkpoint, tmp_path, unmasked):
    sha = read_card(checkpoint).weights_sha256
    write_backend_report(_report(sha, machine_identity("cpu")), checkpoint)
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint)
        status = service.verification.status
        assert (status.phase, status.source, status.image_set) == ("verified", "checkpoint", "test")
        assert service.engine.model.backend == status.chosen == "bf16"
    assert not (tmp_path / CACHE_FOLDER).exists() or not any((tmp_path / CACHE_FOLDER).glob("*.json"))


async def test_a_pinned_backend_is_never_measured(checkpoint, tmp_path, unmasked):
    async with Service(tmp_path, pinned="fused") as service:
        await service.engine.swap(checkpoint)
        assert service.verification.status.phase == "pinned"
        assert "APP_CPU_BACKEND=fused" in service.verification.status.summary


async def test_without_a_verification_set_the_reference_is_kept_and_says_how_to_get_one(checkpoint, tmp_path,
                                                                                       unmasked):
    (checkpoint / VERIFICATION_FILE).unlink()
    async with Service(tmp_path) as service:
        await service.engine.swap(checkpoint)
        status = service.verification.status
        assert status.phase == "kept_reference"
        assert VERIFICATION_FILE in status.summary and "training.verify_backends" in status.summary


async def test_a_verification_set_for_other_weights_keeps_the_reference_and_says_why(checkpoint, tmp_path,
                                                                                    tiny_checkpoint, unmasked):
    other = shutil.copytree(checkpoint, tmp_path / "other")
    make_checkpoint(other, seed=1, architecture="fastcnn")  # new weights, the old verification set
    async with Service(tmp_path) as service:
        await service.engine.swap(other)
        await service.until("kept_reference", "verified")
        status = service.verification.status
        assert status.phase == "kept_reference"
        assert "was written for weights" in status.summary and service.engine.model.backend == "fused"


def _report(sha: str, machine) -> BackendReport:
    def row(backend: str, accuracy: float, speed: float) -> BackendMeasurement:
        return BackendMeasurement(backend=backend, accuracy=accuracy, agreement=1.0, max_probability_diff=0.001,
                                  max_logit_diff=0.01, images_per_s={1: speed, 16: speed, 64: speed},
                                  startup_s=0.0, first_calls_s=0.0)
    return BackendReport(weights_sha256=sha, architecture="fastcnn", machine=machine, reference="eager",
                         test_images=100, backends=(row("eager", 0.5, 10), row("fused", 0.5, 11),
                                                    row("bf16", 0.5, 30)),
                         conditions={"versions": library_versions()})


def test_the_child_measures_at_the_lowest_priority_and_prints_one_report(checkpoint):
    """The measurement is a process of its own (its own GIL), niced so that serving keeps the cores."""
    result = subprocess.run([sys.executable, "-m", "app.engine.verification_child", "--weights", str(checkpoint),
                             "--batch-sizes", "1", "4", "--seconds", "0.02", "--rounds", "1"],
                            capture_output=True, text=True, timeout=PHASE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    report = BackendReport.model_validate_json(result.stdout)
    assert report.conditions["niceness"] == NICENESS
    assert report.conditions["scheduler"] == ("SCHED_IDLE" if sys.platform == "linux" else "default")
    assert report.image_set == "verification" and report.test_images == IMAGES
    assert report.calibration_sha256 == file_sha256(checkpoint / CALIBRATION_FILE)
    assert sorted(report.reference_measurement.images_per_s) == [1, 4]


def test_the_child_refuses_a_checkpoint_without_a_verification_set_in_one_line(checkpoint):
    (checkpoint / VERIFICATION_FILE).unlink()
    result = subprocess.run([sys.executable, "-m", "app.engine.verification_child", "--weights", str(checkpoint)],
                            capture_output=True, text=True, timeout=PHASE_TIMEOUT_S)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no verification set at {checkpoint}")
