"""The child process that measures a checkpoint's CPU backends for the service (``app.engine.self_verification``).

    python -m app.engine.verification_child --weights DIR --passes 2 --threads 1 --batch-sizes 1 16 64

It loads the checkpoint as the service does, measures every CPU backend on the checkpoint's verification
set (``model.calibration_set``) with ``training.verify_backends``' own measurement (accuracy, top-1
agreement and the largest probability and logit differences against eager float32, images/s at each batch
size, start-up), int8 calibrated on the checkpoint's ``calibration.safetensors``, and prints the report as
one JSON document on stdout; progress goes to stderr, one line per step. It writes nothing.

Why a process of its own: measuring is seconds of Python and of every core, and in the serving process it
would hold the GIL against the event loop and the decoders. It runs at the lowest CPU priority (nice 19 and,
on Linux, SCHED_IDLE), so it takes the cores only while the service leaves them idle, and it ends when the service does
(PR_SET_PDEATHSIG). It inherits the service's environment, ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA
included, so it measures the kernels the service runs. This is the one place ``app`` reaches past
training's light contract, and only in this process.

Exit codes: 0 measured, 1 the checkpoint or its verification set cannot be used (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from model.child_process import end_with_parent

NICENESS = 19


def _follow_the_parent() -> None:
    """Lowest priority, and a SIGTERM when the service dies, however it dies. Before any thread starts, so
    torch's and ONNX Runtime's threads inherit both."""
    os.nice(NICENESS)
    if sys.platform == "linux":
        # SCHED_IDLE on top of nice 19: a serving thread that wakes takes the core at once, instead of
        # waiting out the child's time slice (nice alone raised /predict's p99 2.2x while measuring).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    end_with_parent(signal.SIGTERM)


def _scheduler() -> str:
    if sys.platform != "linux":
        return "default"
    return {os.SCHED_IDLE: "SCHED_IDLE", os.SCHED_OTHER: "SCHED_OTHER"}.get(os.sched_getscheduler(0), "other")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.engine.verification_child",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="the checkpoint directory")
    parser.add_argument("--passes", type=int, default=1, help="forward passes at once (the engine's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pass (the engine's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64], help="batch sizes to time")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed per backend, batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is kept")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _follow_the_parent()
    # torch's deprecation notices about its quantization API would reach /model as progress lines.
    warnings.filterwarnings("ignore")
    import torch

    from model.calibration_set import CalibrationSetError, load_calibration_set, load_verification_set
    from model.card import CALIBRATION_FILE, CheckpointError, file_sha256
    from model.checkpoint import load_checkpoint
    from training.verify_backends import VerificationSettings, measure_backends

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        checkpoint = load_checkpoint(args.weights, "cpu")
        sha = checkpoint.card.weights_sha256
        pixels, labels = load_verification_set(args.weights, sha)
    except (CheckpointError, CalibrationSetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    try:
        calibration = torch.from_numpy(load_calibration_set(args.weights, sha))
        calibration_sha256: str | None = file_sha256(args.weights / CALIBRATION_FILE)
    except CalibrationSetError as error:  # int8 is then measured on the verification images' first ones
        log(f"int8 calibrates on the verification set's first images: {error}")
        calibration, calibration_sha256 = torch.from_numpy(pixels[:256]), None
    settings = VerificationSettings(batch_sizes=tuple(args.batch_sizes), seconds=args.seconds, rounds=args.rounds,
                                    threads=args.threads, passes=args.passes, calibration_images=len(calibration))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    report = measure_backends(checkpoint, images, torch.from_numpy(labels), calibration, torch.device("cpu"),
                              settings, image_set="verification", log=log)
    if calibration_sha256 is None:  # int8's figures then hold for no file a service could calibrate on
        report = report.model_copy(update={
            "backends": tuple(row for row in report.backends if row.backend != "int8"),
            "skipped": {**report.skipped, "int8": f"the checkpoint has no usable {CALIBRATION_FILE}"}})
    else:
        report = report.model_copy(update={"calibration_sha256": calibration_sha256})
    report = report.model_copy(update={"conditions": {**report.conditions, "niceness": os.nice(0),
                                                      "scheduler": _scheduler()}})
    sys.stdout.write(report.model_dump_json() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
