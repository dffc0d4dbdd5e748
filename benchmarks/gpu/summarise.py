"""Gather what the GPU run has produced so far into one results.json; run.sh calls it after every step, so the file
that comes back holds every finished step's figures whatever happened later.

    python -m benchmarks.gpu.summarise --work .gpu-work --out $OUT/results.json --started EPOCH_SECONDS

From the work folder, each part only where it exists: the steps (steps.jsonl: name, status, rc, seconds), the
environment (environment.txt), the training run's metrics (per-epoch time, final-epoch accuracy with and without
TTA, images/s, MFU), the run's CUDA backend verification (fp32 against bf16 autocast on the whole test set, bound to
the weights' SHA-256; weights_parts.py join writes it back next to the weights), the GPU tests' counts (JUnit XML),
accuracy through the API and the serving sweeps. A part that cannot be read is reported as an error, never raised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

# Standard library only at the top: results.json must be written even when the wheels did not install (pydantic
# missing); the parts that need torch or the project import it themselves, and part() reports their failure.

# Dense bf16 tensor-core peak of an H100 or H200 SXM (NVIDIA's datasheet, without sparsity); MFU is against it.
HOPPER_BF16_PEAK_TFLOPS = 989.4
BACKEND_REPORT = "backends-cuda.json"  # model.backend_report.report_file("cuda"), which imports pydantic


def training_flops_per_image(architecture: str) -> float:
    """Forward + backward FLOPs of one 32x32 image, counted on the CPU (the count does not depend on the
    device); the SGD update's element-wise work is left out, as MFU conventionally does."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.architectures import build_model

    model = build_model(architecture)
    images = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def cached_flops_per_image(architecture: str, cache: Path) -> float:
    """training_flops_per_image, counted once per run: the count costs a torch import and a ResNet-50 pass, seconds
    that every later step's summary would pay again on the device."""
    counts = json.loads(cache.read_text()) if cache.is_file() else {}
    if architecture not in counts:
        counts[architecture] = training_flops_per_image(architecture)
        cache.write_text(json.dumps(counts) + "\n")
    return counts[architecture]


def training_summary(run_dir: Path) -> dict:
    from training.metrics import read_metrics

    config = json.loads((run_dir / "config.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [record for record in records if record["event"] == "epoch"]
    final = next((record for record in reversed(records) if record["event"] == "final"), None)
    seconds = [record["epoch_seconds"] for record in epochs]
    summary: dict = {"epochs_done": len(epochs), "epoch_seconds": seconds, "finished": final is not None}
    if not epochs:
        return summary
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    images_per_s = statistics.median(record["images_per_s"] for record in epochs[1:] or epochs)
    architecture = config.get("arch") or config.get("config", {}).get("arch", "resnet50")
    flops = cached_flops_per_image(architecture, run_dir.parent / "training-flops.json")
    achieved = images_per_s * flops / 1e12
    summary |= {
        "architecture": architecture,
        # The first epoch pays for cuDNN's autotuning and the allocator's growth: its excess over a steady one.
        "first_epoch_excess_seconds": max(0.0, seconds[0] - steady),
        "images_per_s": images_per_s,
        "training_gflop_per_image": flops / 1e9,
        "achieved_tflops": achieved,
        "mfu_vs_hopper_bf16_peak": achieved / HOPPER_BF16_PEAK_TFLOPS,
        "config": config,
    }
    if final is not None:
        summary |= {key: final.get(key) for key in ("train_seconds", "test_accuracy", "test_accuracy_tta",
                                                    "per_class_accuracy", "precision", "device")}
    return summary


def gpu_tests(junit: Path) -> dict:
    suites = ElementTree.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    assert suite is not None
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     "failed_tests": failed, "seconds": float(suite.get("time", 0))}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def part(reader: Callable[[Path], dict | str | list], path: Path) -> dict | str | list | None:
    """What ``reader`` makes of ``path``; None where the step has not written it; an error where it cannot."""
    if not path.exists():
        return None
    try:
        return reader(path)
    except Exception as error:  # a half-written or odd file must not cost the other parts
        return {"error": f"{type(error).__name__}: {error}"}


def collect(work: Path, started: float | None) -> dict:
    steps = part(lambda path: [json.loads(line) for line in path.read_text().splitlines() if line.strip()],
                 work / "steps.jsonl")
    results = {
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "script_wall_seconds": None if started is None else round(time.time() - started, 1),
        "steps": steps,
        "environment": part(lambda path: path.read_text(), work / "environment.txt"),
        "training": part(training_summary, work / "run") if (work / "run" / "config.json").exists() else None,
        "backends": part(read_json, work / "run" / "checkpoint" / BACKEND_REPORT),
        "gpu_tests": part(gpu_tests, work / "gpu-tests.xml"),
        "api_accuracy": part(read_json, work / "api_accuracy.json"),
        "serving": part(read_json, work / "serve.json"),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="run.sh's work folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--started", type=float, default=None, help="the script's start, in seconds since the epoch")
    args = parser.parse_args()
    results = collect(args.work, args.started)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, args.out)  # whole or not at all, if the time limit strikes mid-write
    training = results["training"]
    if isinstance(training, dict) and training.get("finished"):
        print(f"training: {training['epochs_done']} epochs, {training['train_seconds']:.1f} s, test accuracy "
              f"{training['test_accuracy']:.4f} ({training['test_accuracy_tta']} with flip-TTA), "
              f"{training['images_per_s']:.0f} images/s, {training['achieved_tflops']:.1f} TFLOP/s, "
              f"MFU {training['mfu_vs_hopper_bf16_peak']:.1%}")


if __name__ == "__main__":
    main()
