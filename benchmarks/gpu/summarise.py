"""Gather the GPU run's figures into one results.json: the training run's metrics (per-epoch time, the
compile time, training time without it, final-epoch accuracy with and without TTA, images/s, MFU) and the
serving benchmark's JSON, next to the machine that produced them."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.architectures import build_model
from model.backend_report import report_file
from training.metrics import read_metrics

# Dense bf16 tensor-core peak of an H100 SXM (NVIDIA's datasheet, without sparsity); MFU is against it.
H100_BF16_PEAK_TFLOPS = 989.4
BACKEND_REPORT = report_file("cuda")


def training_flops_per_image(architecture: str) -> float:
    """Forward + backward FLOPs of one 32x32 image, counted on the CPU (the count does not depend on the
    device); the SGD update's element-wise work is left out, as MFU conventionally does."""
    model = build_model(architecture)
    images = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def training_summary(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [record for record in records if record["event"] == "epoch"]
    final = next(record for record in reversed(records) if record["event"] == "final")
    seconds = [record["epoch_seconds"] for record in epochs]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    # The first epoch pays for torch.compile (and cuDNN's autotuning); the excess over a steady epoch is it.
    compile_seconds = max(0.0, seconds[0] - steady)
    images_per_s = statistics.median(record["images_per_s"] for record in epochs[1:] or epochs)
    architecture = config.get("arch") or config.get("config", {}).get("arch", "resnet50")
    flops = training_flops_per_image(architecture)
    achieved = images_per_s * flops / 1e12
    return {
        "architecture": architecture,
        "epochs": len(epochs),
        "epoch_seconds": seconds,
        "compile_seconds_estimate": compile_seconds,
        "train_seconds": final["train_seconds"],
        "train_seconds_without_compile": final["train_seconds"] - compile_seconds,
        "test_accuracy": final["test_accuracy"],
        "test_accuracy_tta": final.get("test_accuracy_tta"),
        "per_class_accuracy": final.get("per_class_accuracy"),
        "images_per_s": images_per_s,
        "training_gflop_per_image": flops / 1e9,
        "achieved_tflops": achieved,
        "mfu_vs_h100_bf16_peak": achieved / H100_BF16_PEAK_TFLOPS,
        "config": config,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the training run directory")
    parser.add_argument("--serve", type=Path, required=True, help="serve_gpu.py's JSON")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--api-accuracy", type=Path, default=None, help="benchmarks.api_accuracy's JSON")
    parser.add_argument("--wall-seconds", type=float, default=None, help="the whole script's time so far")
    args = parser.parse_args()
    serving = json.loads(args.serve.read_text()) if args.serve.is_file() else {"error": "no serving results"}
    api_accuracy = (json.loads(args.api_accuracy.read_text()) if args.api_accuracy and args.api_accuracy.is_file()
                    else {"error": "no API accuracy results"})
    # The run's end verified fp32 against bf16 autocast on the whole test set (training.verify_backends).
    report = args.run / "checkpoint" / BACKEND_REPORT
    backends = json.loads(report.read_text()) if report.is_file() else {"error": f"no {BACKEND_REPORT}"}
    results = {"training": training_summary(args.run), "serving": serving, "api_accuracy": api_accuracy,
               "backends": backends, "script_wall_seconds": args.wall_seconds}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    training = results["training"]
    print(f"training: {training['epochs']} epochs, {training['train_seconds']:.1f} s "
          f"({training['compile_seconds_estimate']:.1f} s of it compile), test accuracy "
          f"{training['test_accuracy']:.4f} ({training['test_accuracy_tta']} with flip-TTA), "
          f"{training['images_per_s']:.0f} images/s, {training['achieved_tflops']:.1f} TFLOP/s, "
          f"MFU {training['mfu_vs_h100_bf16_peak']:.1%}")


if __name__ == "__main__":
    main()
