"""Training throughput of the real training step: images/s and achieved TFLOP/s on whatever device is here.

    .venv/bin/python -m benchmarks.train_throughput                                  # GPU: resnet50, batch 512
    .venv/bin/python -m benchmarks.train_throughput --batch-size 32 --steps 3        # what the CPU can afford

Each step is `training.loop.train_step`, the one the trainer runs: on-device augmentation of a uint8 batch,
bf16 autocast on CUDA, channels_last, label-smoothed loss, SGD+Nesterov and the LR schedule. FLOPs are
counted once with torch.utils.flop_counter.FlopCounterMode on one forward+backward of the same model
(convolutions and matmuls; the optimizer's elementwise work is left out, as is usual for MFU), and the
achieved TFLOP/s is that count times the measured steps per second. The seconds per 50,000-image epoch and
the epochs that fit in 150 s follow, which is how the default --epochs was chosen (README, "Training").

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
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.architectures import ARCHITECTURES
from training.config import TrainingConfig
from training.distributed import Worker, resolve_device
from training.loop import build_learner, smoothed_cross_entropy, synchronize, train_step
from training.provenance import git_commit, machine_description
from training.run import autocast_for, configure_backends

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
            compile_model: bool) -> dict:
    config = TrainingConfig(data_dir="", arch=arch, batch_size=batch_size, epochs=1, warmup_epochs=0,
                            compile=compile_model)
    configure_backends(config)
    worker = Worker(rank=0, local_rank=0, world_size=1, device=device)
    learner = build_learner(config, worker, steps_per_epoch=warmup_steps + steps + 1)
    autocast = autocast_for(device)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator)
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
        "compile": compile_model, "bf16_autocast": device.type == "cuda",
        "warmup_seconds": round(warmup_seconds, 3), "step_ms": round(1000 * seconds / steps, 2),
        "images_per_s": round(images_per_s, 1),
        "gflop_per_image": round(flops_per_step / batch_size / 1e9, 3),
        "achieved_tflop_per_s": round(flops_per_step * steps / seconds / 1e12, 4),
        "seconds_per_epoch": round(epoch_seconds, 2),
        "epochs_in_150_s": round(BUDGET_SECONDS / epoch_seconds, 2),
    }


def print_table(machine: dict, result: dict) -> None:
    print(f"device: {machine['device']}  (torch {machine['torch_version']}, {machine['cpu_cores']} CPU cores)")
    rows = [("arch", result["arch"]), ("batch size", result["batch_size"]),
            ("timed steps", f"{result['steps']} (after {result['warmup_steps']} warm-up, "
                            f"{result['warmup_seconds']} s)"),
            ("step", f"{result['step_ms']} ms"), ("images/s", f"{result['images_per_s']:,.1f}"),
            ("GFLOP per image (fwd+bwd)", result["gflop_per_image"]),
            ("achieved TFLOP/s", result["achieved_tflop_per_s"]),
            ("s per 50,000-image epoch", result["seconds_per_epoch"]),
            (f"epochs in {BUDGET_SECONDS} s", result["epochs_in_150_s"])]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


def result_path(machine: dict, result: dict) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", machine["device"].split("(")[0].lower()).strip("-")
    compiled = "_compiled" if result["compile"] else ""
    return RESULTS / f"train_throughput_{device}_{result['arch']}_b{result['batch_size']}{compiled}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="resnet50")
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
    result = measure(args.arch, args.batch_size, args.steps, args.warmup_steps, device, args.compile)
    print_table(machine, result)
    if not args.no_save:
        record = {"benchmark": "train_throughput", "machine": machine, "result": result,
                  "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
                  "command": " ".join(["python -m benchmarks.train_throughput", *sys.argv[1:]]),
                  "git_commit": git_commit(), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = result_path(machine, result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
