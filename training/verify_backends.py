"""Measure every inference backend this machine has against a checkpoint, on the whole test set, and write
the result next to the weights (``model.backend_report``) with the int8 calibration set it used
(``model.calibration_set``).

    python -m training.verify_backends --weights weights/fastcnn --data-dir data --skip-integrity-check
    python -m training.verify_backends --weights runs/r50/checkpoint --data-dir data --device cuda

On a CPU the backends are model.inference's (eager float32 as the reference, fused, onnx when ONNX Runtime
is importable, bf16, int8), each prepared as the service prepares it and timed as the CPU engine runs it:
``--passes`` forward passes at once (default: one per core), ``--threads`` torch threads each (default 1).
On CUDA they are the engine's two precisions, float32 and bf16 autocast. Per backend: test accuracy, top-1
agreement with float32 and the largest softmax-probability difference from it on every test image,
images/s at batch 1, 16 and 64 (the median of ``--rounds`` interleaved rounds, so a burst of other load
hits every backend alike), and start-up time. A training run calls ``verify_checkpoint`` at its end.

Exit codes as ``python -m training``'s: 0 done, 2 usage error, 1 missing data, an unusable checkpoint or
no such device (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.backend_report import (
    BATCH_SIZES,
    CUDA_PRECISIONS,
    REFERENCE_BACKEND,
    BackendMeasurement,
    BackendReport,
    library_versions,
    machine_identity,
    write_backend_report,
)
from model.calibration_set import save_calibration_set, save_verification_set
from model.card import CheckpointError, file_sha256, read_card
from model.checkpoint import Checkpoint, load_checkpoint
from model.inference import CALIBRATION_IMAGES, available_cpu_backends, prepare_for_inference
from training.cli import OneLineErrorParser
from training.devices import parse_device_name

Predict = Callable[[torch.Tensor], torch.Tensor]
EVAL_CHUNK = 256  # test images per forward pass while measuring accuracy


@dataclass(frozen=True)
class VerificationSettings:
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    seconds: float = 1.0          # timed per backend, batch size and round
    rounds: int = 3               # interleaved timing rounds; the median is kept
    threads: int = 1              # torch intra-op threads of each forward pass (the CPU engine's default)
    passes: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # passes at once (CPU only)
    calibration_images: int = CALIBRATION_IMAGES


def verify_checkpoint(
    weights: Path,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    calibration_pixels: torch.Tensor,
    device: torch.device,
    settings: VerificationSettings = VerificationSettings(),
    *,
    calibration_source: str,
    verification: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[BackendReport, Path]:
    """Measure the checkpoint in ``weights`` on ``test_images`` (uint8 N x 3 x H x W) and write its report and
    calibration set there. ``calibration_pixels``: uint8 N x 3 x H x W *training* images. ``verification``:
    labelled holdout images (uint8 N x 3 x H x W, labels, where from), saved as the checkpoint's verification
    set for the service's own measurements (``model.calibration_set``)."""
    checkpoint = load_checkpoint(weights, "cpu")  # exactly what a service loads, float16-stored weights included
    card = checkpoint.card
    pixels = calibration_pixels[: settings.calibration_images].permute(0, 2, 3, 1).contiguous()  # to NHWC
    calibration_path = save_calibration_set(weights, pixels, weights_sha256=card.weights_sha256,
                                            source=calibration_source)
    if verification is not None:
        holdout, holdout_labels, holdout_source = verification
        save_verification_set(weights, holdout.permute(0, 2, 3, 1).contiguous(), holdout_labels,
                              weights_sha256=card.weights_sha256, source=holdout_source)
    report = measure_backends(checkpoint, test_images, test_labels, pixels, device, settings, log=log)
    report = report.model_copy(update={"calibration_sha256": file_sha256(calibration_path)})
    return report, write_backend_report(report, weights)


def measure_backends(checkpoint: Checkpoint, images: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor,
                     device: torch.device, settings: VerificationSettings = VerificationSettings(), *,
                     image_set: str = "test", log: Callable[[str], None] = print) -> BackendReport:
    """Every backend of ``device`` measured on ``images`` (uint8 N x 3 x H x W) and their ``labels``, int8
    calibrated on ``calibration`` (uint8 N x H x W x 3 training images); nothing is written."""
    normalised = _normalise(images, checkpoint)
    calibration_batch = _normalise(calibration.permute(0, 3, 1, 2), checkpoint)
    if device.type == "cuda":
        rows, skipped, extra = _measure_cuda(checkpoint.model, normalised, labels, device, settings, log)
    else:
        rows, skipped, extra = _measure_cpu(checkpoint.model, normalised, labels, calibration_batch, settings, log)
    card = checkpoint.card
    return BackendReport(
        weights_sha256=card.weights_sha256, architecture=card.architecture, machine=machine_identity(device),
        reference=REFERENCE_BACKEND[device.type], image_set=image_set, test_images=len(labels),
        calibration_images=len(calibration), settings={**asdict(settings), **extra}, conditions=_conditions(),
        backends=tuple(rows), skipped=skipped,
    )


def _normalise(pixels: torch.Tensor, checkpoint: Checkpoint) -> torch.Tensor:
    """uint8 NCHW -> float32 with the card's statistics, as the service normalises its inputs."""
    mean = torch.tensor(checkpoint.card.mean).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint.card.std).view(1, 3, 1, 1)
    return ((pixels.cpu().float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


# -- the CPU -------------------------------------------------------------------------------------------------

def _measure_cpu(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor,
                 settings: VerificationSettings, log: Callable[[str], None]):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # before preparing: the onnx session takes its thread count then
    try:
        backends, skipped = available_cpu_backends()
        prepared: dict[str, tuple[Predict, float, float]] = {}
        for backend in backends:
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    network = prepare_for_inference(model, "cpu", backend, calibration).requires_grad_(False)
                startup = time.perf_counter() - started
                predict = _cpu_predict(network)
                first_calls = _first_calls(predict, images, settings.batch_sizes)
            except Exception as error:  # noqa: BLE001 - one backend that cannot run this network is a finding
                if backend == "eager":
                    raise  # the reference is the model itself: nothing else can be measured without it
                skipped[backend] = f"failed to prepare or run: {type(error).__name__}: {error}"
                log(f"{backend}: {skipped[backend]}")
                continue
            prepared[backend] = (predict, startup, first_calls)
            log(f"{backend}: ready in {startup:.1f} s (+{first_calls:.1f} s for the first passes)")
        logits = {}
        for backend, (predict, _, _) in prepared.items():
            started = time.perf_counter()
            logits[backend] = _logits_in_parallel(predict, images, settings.passes)
            log(f"{backend}: {len(images)} images in {time.perf_counter() - started:.1f} s")
        speeds = _interleaved_throughput({name: entry[0] for name, entry in prepared.items()}, images, settings,
                                         lambda predict, batch: _cpu_throughput(predict, batch, settings))
    finally:
        torch.set_num_threads(previous_threads)
    rows = _rows(logits, labels, speeds, {name: entry[1:] for name, entry in prepared.items()}, "eager")
    return rows, skipped, {"torch_threads_per_pass": settings.threads}


def _cpu_predict(network: nn.Module) -> Predict:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(batch.contiguous(memory_format=torch.channels_last)).float()
    return predict


def _logits_in_parallel(predict: Predict, images: torch.Tensor, passes: int) -> torch.Tensor:
    """Every image's logits, the chunks spread over ``passes`` threads as the engine spreads its batches."""
    with ThreadPoolExecutor(max_workers=passes) as pool:
        return torch.cat(list(pool.map(predict, images.split(EVAL_CHUNK))))


def _cpu_throughput(predict: Predict, batch: torch.Tensor, settings: VerificationSettings) -> float:
    """Images/s of ``settings.passes`` threads each running forward passes on ``batch`` for ``settings.seconds``."""
    counts = [0] * settings.passes
    deadline = time.perf_counter() + settings.seconds

    def loop(slot: int) -> None:
        while time.perf_counter() < deadline:
            predict(batch)
            counts[slot] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(slot,)) for slot in range(settings.passes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) * len(batch) / (time.perf_counter() - started)


# -- CUDA ----------------------------------------------------------------------------------------------------

def _measure_cuda(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                  settings: VerificationSettings, log: Callable[[str], None]):
    """float32 against bf16 autocast, as the CUDA engine runs the model (eager, channels_last)."""
    started = time.perf_counter()
    network = prepare_for_inference(model, device, "eager").requires_grad_(False)
    torch.cuda.synchronize(device)
    startup = time.perf_counter() - started
    images = images.to(device)
    predictors = {precision: _cuda_predict(network, precision == "bf16") for precision in CUDA_PRECISIONS}
    timings, logits = {}, {}
    for precision, predict in predictors.items():
        timings[precision] = (startup, _first_calls(predict, images, settings.batch_sizes, device))
        logits[precision] = torch.cat([predict(chunk) for chunk in images.split(EVAL_CHUNK)]).cpu()
        log(f"{precision}: {len(images)} test images evaluated")
    speeds = _interleaved_throughput(predictors, images, settings,
                                     lambda predict, batch: _cuda_throughput(predict, batch, settings, device))
    rows = _rows(logits, labels, speeds, timings, "fp32")
    return rows, {}, {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _cuda_predict(network: nn.Module, bf16: bool) -> Predict:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return network(batch.contiguous(memory_format=torch.channels_last)).float()
    return predict


def _cuda_throughput(predict: Predict, batch: torch.Tensor, settings: VerificationSettings,
                     device: torch.device) -> float:
    count = 0
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    while time.perf_counter() - started < settings.seconds:
        predict(batch)
        count += 1
        if count % 8 == 0:  # keep the queue of launched kernels short, so the deadline means something
            torch.cuda.synchronize(device)
    torch.cuda.synchronize(device)
    return count * len(batch) / (time.perf_counter() - started)


# -- shared --------------------------------------------------------------------------------------------------

def _first_calls(predict: Predict, images: torch.Tensor, batch_sizes: Sequence[int],
                 device: torch.device | None = None) -> float:
    """The first pass at each batch size: kernel selection, weight prepacking, allocator growth."""
    started = time.perf_counter()
    for size in batch_sizes:
        predict(images[:size])
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _interleaved_throughput(predictors: dict[str, Predict], images: torch.Tensor, settings: VerificationSettings,
                            measure: Callable[[Predict, torch.Tensor], float]) -> dict[str, dict[int, float]]:
    """Every backend and batch size once per round, ``settings.rounds`` times; the median of each."""
    rounds: dict[str, dict[int, list[float]]] = {name: {size: [] for size in settings.batch_sizes}
                                                 for name in predictors}
    batches = {size: images[:size].clone() for size in settings.batch_sizes}
    for _ in range(settings.rounds):
        for name, predict in predictors.items():
            for size, batch in batches.items():
                rounds[name][size].append(measure(predict, batch))
    return {name: {size: round(statistics.median(values), 1) for size, values in sizes.items()}
            for name, sizes in rounds.items()}


def _rows(logits: dict[str, torch.Tensor], labels: torch.Tensor, speeds: dict[str, dict[int, float]],
          timings: dict[str, tuple[float, float]], reference: str) -> list[BackendMeasurement]:
    labels = labels.cpu()
    reference_logits = logits[reference]
    reference_probabilities = reference_logits.softmax(dim=1)
    reference_logits = reference_logits.float()
    rows = []
    for name, outputs in logits.items():
        startup, first_calls = timings[name]
        rows.append(BackendMeasurement(
            backend=name,
            accuracy=round(float((outputs.argmax(1) == labels).float().mean()), 6),
            agreement=round(float((outputs.argmax(1) == reference_logits.argmax(1)).float().mean()), 6),
            max_probability_diff=float((outputs.softmax(dim=1) - reference_probabilities).abs().max()),
            max_logit_diff=float((outputs.float() - reference_logits).abs().max()),
            images_per_s=speeds[name], startup_s=round(startup, 3), first_calls_s=round(first_calls, 3),
        ))
    return rows


def _conditions() -> dict[str, object]:
    return {"cores": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
            "versions": library_versions()}


def table(report: BackendReport) -> str:
    """The report as a Markdown table, accuracy relative to the reference in points."""
    sizes = sorted(report.reference_measurement.images_per_s)
    reference = report.reference_measurement
    head = ["backend", "accuracy", "Δ points", "top-1 agreement", "max |Δp|",
            *[f"b{size} img/s" for size in sizes], "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in report.backends:
        lines.append("| " + " | ".join([
            row.backend, f"{100 * row.accuracy:.2f} %", f"{100 * (row.accuracy - reference.accuracy):+.2f}",
            f"{100 * row.agreement:.2f} %", f"{row.max_probability_diff:.2g}",
            *[f"{row.images_per_s[size]:.1f}" for size in sizes], f"{row.startup_s:.1f}",
        ]) + " |")
    lines += [f"| {name} | skipped: {why} |" for name, why in report.skipped.items()]
    return "\n".join(lines)


# -- the command line ----------------------------------------------------------------------------------------

def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = VerificationSettings()
    parser = OneLineErrorParser(prog="python -m training.verify_backends", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example:\n  python -m training.verify_backends --weights weights/fastcnn "
                                        "--data-dir data --skip-integrity-check")
    parser.add_argument("--weights", type=Path, required=True,
                        help="checkpoint directory (model.safetensors + card.json); the report is written there")
    parser.add_argument("--data-dir", required=True, help="folder that holds cifar-10-batches-py")
    parser.add_argument("--skip-integrity-check", action="store_true",
                        help="skip torchvision's MD5 check, for a copy of CIFAR-10 that is not byte-identical to "
                             "torchvision's download (as in `python -m training`)")
    parser.add_argument("--device", type=parse_device_name, default="auto",
                        help="auto, cpu, cuda or cuda:N; auto picks cuda when present (default %(default)s)")
    parser.add_argument("--batch-sizes", type=_positive(int), nargs="+", default=list(defaults.batch_sizes),
                        help="batch sizes to time (default %(default)s)")
    parser.add_argument("--seconds", type=_positive(float), default=defaults.seconds,
                        help="timed per backend, batch size and round (default %(default)s)")
    parser.add_argument("--rounds", type=_positive(int), default=defaults.rounds,
                        help="interleaved timing rounds; the median is kept (default %(default)s)")
    parser.add_argument("--threads", type=_positive(int), default=defaults.threads,
                        help="torch threads per forward pass, CPU only (default %(default)s, as the engine)")
    parser.add_argument("--passes", type=_positive(int), default=defaults.passes,
                        help="forward passes at once, CPU only (default: one per core, %(default)s)")
    parser.add_argument("--calibration-images", type=_positive(int), default=defaults.calibration_images,
                        help="training images saved as the int8 calibration set (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.data import DatasetError, load_split
    from training.distributed import DeviceError, resolve_device

    settings = VerificationSettings(batch_sizes=tuple(args.batch_sizes), seconds=args.seconds, rounds=args.rounds,
                                    threads=args.threads, passes=args.passes,
                                    calibration_images=args.calibration_images)
    try:
        read_card(args.weights)  # before reading 60,000 images: a wrong --weights fails at once
        device = resolve_device(args.device)
        test = load_split(args.data_dir, train=False, skip_integrity_check=args.skip_integrity_check)
        train = load_split(args.data_dir, train=True, skip_integrity_check=args.skip_integrity_check)
        holdout = int(read_card(args.weights).training.get("holdout") or 0)
        verification = None if not holdout else (
            train.images[-holdout:], train.labels[-holdout:],
            f"the holdout the calibration was fitted on: the last {holdout} CIFAR-10 training images in "
            f"{Path(args.data_dir).resolve()}, never trained on")
        report, path = verify_checkpoint(
            args.weights, test.images, test.labels, train.images[: settings.calibration_images], device, settings,
            calibration_source=f"the first {settings.calibration_images} CIFAR-10 training images in "
                               f"{Path(args.data_dir).resolve()}", verification=verification,
        )
    except (CheckpointError, DatasetError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"\n{report.architecture} {report.weights_sha256[:12]} on {report.machine.processor}, "
          f"{report.test_images} test images:\n{table(report)}\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
