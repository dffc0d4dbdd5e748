"""Training throughput of the real training step: images/s and achieved TFLOP/s on whatever device is here,
for each architecture and precision asked for, measured one after another in the same run.

    .venv/bin/python -m benchmarks.train_throughput                                  # GPU: resnet50, batch 512
    .venv/bin/python -m benchmarks.train_throughput --device cpu --arch resnet20 resnet50 fastcnn \
        --precision fp32 bf16 --batch-size 128 --steps 8                             # CPU: fp32 against bf16

Each step is `training.loop.train_step`, the one the trainer runs: on-device augmentation of a uint8 batch,
autocast in the precision measured, channels_last, label-smoothed loss, SGD+Nesterov and the LR schedule.
FLOPs are
counted once with torch.utils.flop_counter.FlopCounterMode on one forward+backward of the same model
(convolutions and matmuls; the optimizer's elementwise work is left out, as is usual for MFU), and the
achieved TFLOP/s is that count times the measured steps per second. The seconds per 50,000-image epoch and
the epochs that fit in 150 s follow, which is how the default --epochs was chosen (docs/training.md).

Warm-up steps (cuDNN autotuning, torch.compile with --compile) are timed apart and reported as such. The
table is printed and written as JSON under benchmarks/results/ with the machine named; the 1-minute load
average before and after is saved too, since a shared machine's other work slows a CPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.architectures import ARCHITECTURES
from training.config import PRECISIONS, TrainingConfig
from training.distributed import Worker, resolve_device
from training.loop import build_learner, smoothed_cross_entropy, synchronize, train_step
from training.precision import autocast_for, resolve_precision
from training.provenance import git_commit, machine_description
from training.run import configure_backends

RESULTS = Path(__file__).resolve().parent / "results"
EPOCH_IMAGES = 50_000
BUDGET_SECONDS = 150


def count_step_flops(learner, images: torch.Tensor, labels: torch.Tensor, config: TrainingConfig, autocast) -> int:
    """FLOPs of one forward+backward of the plain (uncompiled) model on a normalised batch."""
    batch = images.float().contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            logits = learner.model(batch)
        smoothed_cross_entropy(logits, labels, config.label_smoothing).backward()
    learner.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(arch: str, batch_size: int, steps: int, warmup_steps: int, device: torch.device,
            compile_model: bool, precision: str) -> dict:
    config = TrainingConfig(data_dir="", arch=arch, batch_size=batch_size, epochs=1, warmup_epochs=0,
                            compile=compile_model, precision=precision)
    configure_backends(config)
    worker = Worker(rank=0, local_rank=0, world_size=1, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator)
    learner = build_learner(config, worker, steps_per_epoch=warmup_steps + steps + 1, train_images=images)
    resolved = resolve_precision(precision, device)
    autocast = autocast_for(device, resolved)
    labels = torch.randint(0, 10, (batch_size,), device=device, generator=generator)
    flops_per_step = count_step_flops(learner, images, labels, config, autocast)

    synchronize(device)
    started = time.perf_counter()
    for _ in range(warmup_steps):
        train_step(learner, images, labels, generator, config, autocast)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(steps):
        train_step(learner, images, labels, generator, config, autocast)
    synchronize(device)
    seconds = time.perf_counter() - started

    images_per_s = steps * batch_size / seconds
    epoch_seconds = EPOCH_IMAGES / images_per_s
    return {
        "arch": arch, "batch_size": batch_size, "steps": steps, "warmup_steps": warmup_steps,
        "compile": compile_model, "precision": resolved,
        "warmup_seconds": round(warmup_seconds, 3), "step_ms": round(1000 * seconds / steps, 2),
        "images_per_s": round(images_per_s, 1),
        "gflop_per_image": round(flops_per_step / batch_size / 1e9, 3),
        "achieved_tflop_per_s": round(flops_per_step * steps / seconds / 1e12, 4),
        "seconds_per_epoch": round(epoch_seconds, 2),
        "epochs_in_150_s": round(BUDGET_SECONDS / epoch_seconds, 2),
    }


COLUMNS = (("arch", "arch", "{}"), ("precision", "precision", "{}"), ("batch", "batch_size", "{}"),
           ("step ms", "step_ms", "{:.1f}"), ("images/s", "images_per_s", "{:,.1f}"),
           ("vs fp32", "speedup_over_fp32", "{:.2f}x"), ("GFLOP/img", "gflop_per_image", "{:.3f}"),
           ("TFLOP/s", "achieved_tflop_per_s", "{:.4f}"), ("s/epoch", "seconds_per_epoch", "{:,.1f}"),
           (f"epochs in {BUDGET_SECONDS} s", "epochs_in_150_s", "{:.2f}"))


def add_speedups(results: list[dict]) -> None:
    """Each result's images/s over the fp32 result of the same architecture and batch, where one was measured."""
    fp32 = {(r["arch"], r["batch_size"]): r["images_per_s"] for r in results if r["precision"] == "fp32"}
    for result in results:
        baseline = fp32.get((result["arch"], result["batch_size"]))
        result["speedup_over_fp32"] = round(result["images_per_s"] / baseline, 3) if baseline else None


def print_table(machine: dict, results: list[dict]) -> None:
    print(f"device: {machine['device']}  (torch {machine['torch_version']}, {machine['cpu_cores']} CPU cores)")
    cells = [[name for name, _, _ in COLUMNS]]
    for result in results:
        cells.append([("-" if result[key] is None else form.format(result[key])) for _, key, form in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def result_path(machine: dict, results: list[dict]) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", machine["device"].split("(")[0].lower()).strip("-")
    archs = "-".join(dict.fromkeys(r["arch"] for r in results))
    precisions = "-".join(dict.fromkeys(r["precision"] for r in results))
    compiled = "_compiled" if results[0]["compile"] else ""
    return RESULTS / f"train_throughput_{device}_{archs}_{precisions}_b{results[0]['batch_size']}{compiled}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, nargs="+", default=["resnet50"],
                        help="one or more networks (default %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+", default=["auto"],
                        help="one or more of auto, bf16, fp32, each measured in turn (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512, help="default %(default)s (the training default)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step, as --compile does")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = parser.parse_args()

    device = resolve_device(args.device)
    machine = machine_description(device)
    load_before = os.getloadavg()[0]
    results = [measure(arch, args.batch_size, args.steps, args.warmup_steps, device, args.compile, precision)
               for arch in args.arch for precision in args.precision]
    add_speedups(results)
    print_table(machine, results)
    if not args.no_save:
        record = {"benchmark": "train_throughput", "machine": machine, "results": results,
                  "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
                  "command": " ".join(["python -m benchmarks.train_throughput", *sys.argv[1:]]),
                  "git_commit": git_commit(), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        path = result_path(machine, results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
