"""CPU inference backends for one checkpoint, side by side: images/s at batch 1, 8 and 32, start-up time,
and test-set accuracy (or, without trained weights, agreement) relative to the float32 model.

    .venv-bench/bin/python -m benchmarks.cpu_backends                     # random-init resnet50: agreement
    .venv-bench/bin/python -m benchmarks.cpu_backends --weights weights/resnet50 --eval-images 10000

Run it from ``.venv-bench`` (``pip install -e '.[bench]'``): the ``onnx`` and ``int8-pt2e`` rows need
ONNX Runtime and torchao, which the service's venv does not have; under ``.venv`` those rows say why they
were skipped. The real CIFAR-10 test images come from ``--data-dir`` (unpack ../shared/cifar10 with
``.venv/bin/python ../shared/cifar10/compact/unpack.py --out .cache/cifar10``).

Throughput is measured in interleaved rounds (every backend and batch size once per round, then again),
and the median round is reported, so a burst of load from other processes on a shared machine hits all
backends alike instead of one. The 1-minute load average before and after is saved with the results.
Without ``--weights`` the model is a seeded random init: its "accuracy" would be chance, so the table
reports top-1 *agreement* with float32 and the largest probability difference instead.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.architectures import build_model
from model.checkpoint import load_checkpoint
from model.inference import fold_batchnorm, prepare_for_inference
from model.labels import CIFAR10_MEAN, CIFAR10_STD

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
Predict = Callable[[torch.Tensor], torch.Tensor]


# -- the machine ---------------------------------------------------------------------------------------

def describe_machine() -> dict:
    """CPU model, cores, the instruction sets that decide which backends can be fast, and versions."""
    model_name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model_name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("onnxruntime", "torchao"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        "cpu": model_name,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [name for name in interesting if name in flags],
        "versions": versions,
        "load_average_1min": os.getloadavg()[0],
    }


# -- data ----------------------------------------------------------------------------------------------

def read_batch(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and int labels from a CIFAR-10 python batch file."""
    path = data_dir / "cifar-10-batches-py" / name
    if not path.is_file():
        sys.exit(f"no {path}: unpack CIFAR-10 first with "
                 "`.venv/bin/python ../shared/cifar10/compact/unpack.py --out .cache/cifar10`, or pass --data-dir")
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(entry["labels"])


def normalise(images: np.ndarray, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    shape = (1, 3, 1, 1)
    return ((batch - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)).contiguous()


# -- the backends --------------------------------------------------------------------------------------
# Each builder takes the float32 model (eval mode) and calibration images, and returns a callable mapping
# a normalised float32 NCHW batch to float32 logits. Builders that need a missing package raise
# BackendUnavailable with the reason.

class BackendUnavailable(RuntimeError):
    pass


def _channels_last(module: nn.Module) -> Predict:
    module = module.to(memory_format=torch.channels_last)
    return lambda batch: module(batch.contiguous(memory_format=torch.channels_last))


def build_fp32(model: nn.Module, calibration: torch.Tensor) -> Predict:
    return model


def build_channels_last(model: nn.Module, calibration: torch.Tensor) -> Predict:
    return _channels_last(model)


def build_fused(model: nn.Module, calibration: torch.Tensor) -> Predict:
    return _channels_last(prepare_for_inference(model, "cpu", "fused"))


def build_compile(model: nn.Module, calibration: torch.Tensor) -> Predict:
    # dynamic: the engine's batches take every size from 1 to max_batch_size, and one compiled
    # graph per size would cost a compile each.
    fused = fold_batchnorm(model).to(memory_format=torch.channels_last)
    compiled = torch.compile(fused, dynamic=True)
    return lambda batch: compiled(batch.contiguous(memory_format=torch.channels_last))


def build_bf16(model: nn.Module, calibration: torch.Tensor) -> Predict:
    return _channels_last(prepare_for_inference(model, "cpu", "bf16"))


def build_int8_fx(model: nn.Module, calibration: torch.Tensor) -> Predict:
    return prepare_for_inference(model, "cpu", "int8", calibration=calibration)


def build_int8_pt2e(model: nn.Module, calibration: torch.Tensor) -> Predict:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise BackendUnavailable("needs torchao (pip install -e '.[bench]' in .venv-bench)") from None
    fused = fold_batchnorm(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # strict=True: non-strict export records no source_fn_stack, so the quantizer groups the three uses of
    # a Bottleneck's one shared ReLU module into one partition and refuses it ("more than one output node").
    exported = torch.export.export(fused, (calibration[:8],), dynamic_shapes=({0: batch},), strict=True)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    for chunk in calibration.split(32):
        prepared(chunk)
    compiled = torch.compile(convert_pt2e(prepared), dynamic=True)
    return compiled


def build_onnx(model: nn.Module, calibration: torch.Tensor) -> Predict:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendUnavailable("needs onnxruntime, onnx and onnxscript (pip install -e '.[onnx]')") from None
    return prepare_for_inference(model, "cpu", "onnx")


BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor], Predict]] = {
    "fp32": build_fp32,
    "channels_last": build_channels_last,
    "fused": build_fused,
    "compile": build_compile,
    "bf16": build_bf16,
    "int8-fx": build_int8_fx,
    "int8-pt2e": build_int8_pt2e,
    "onnx": build_onnx,
}
NOTES = {
    "fp32": "the model as loaded, NCHW: the reference",
    "channels_last": "weights and inputs NHWC",
    "fused": "Conv+BN folded (model.inference), channels_last",
    "compile": "fused, torch.compile inductor, freezing, dynamic batch",
    "bf16": "fused, channels_last, bfloat16 weights and activations (model.inference)",
    "int8-fx": "fused, FX graph mode static int8, x86 engine (model.inference)",
    "int8-pt2e": "fused, PT2E X86InductorQuantizer static int8, then inductor",
    "onnx": "ONNX Runtime CPU provider, dynamo export, all graph optimisations (model.inference)",
}


# -- measuring -----------------------------------------------------------------------------------------

@dataclass
class Row:
    backend: str
    note: str
    startup_s: float | None = None
    images_per_s: dict[int, float] = field(default_factory=dict)
    rounds: dict[int, list[float]] = field(default_factory=dict)
    agreement: float | None = None
    max_probability_diff: float | None = None
    min_logit_cosine: float | None = None  # of each image's logit vector with fp32's; 1 = same direction
    accuracy: float | None = None
    skipped: str | None = None


def throughput(predict: Predict, batch: torch.Tensor, seconds: float, passes: int) -> float:
    """Images/s of ``passes`` threads each running forward passes on ``batch`` for ``seconds``."""
    counts = [0] * passes
    deadline = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        with torch.inference_mode():
            while time.perf_counter() < deadline:
                predict(batch)
                counts[slot] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(slot,)) for slot in range(passes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) * len(batch) / (time.perf_counter() - started)


def logits_of(predict: Predict, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([predict(chunk).float() for chunk in images.split(batch_size)])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    if args.weights:
        checkpoint = load_checkpoint(args.weights, "cpu")
        model, card = checkpoint.model.eval(), checkpoint.card
        mean, std, weights = card.mean, card.std, f"{args.weights} ({card.version})"
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.architecture).eval()
        mean, std, weights = CIFAR10_MEAN, CIFAR10_STD, f"random init, seed {args.seed}"
    test_images, test_labels = read_batch(args.data_dir, "test_batch")
    evaluation = normalise(test_images[: args.eval_images], mean, std)
    labels = torch.from_numpy(test_labels[: args.eval_images])
    calibration = normalise(read_batch(args.data_dir, "data_batch_1")[0][: args.calibration_images], mean, std)
    inputs = {size: evaluation[:size].clone() for size in args.batch_sizes}

    rows: dict[str, Row] = {}
    predictors: dict[str, Predict] = {}
    for name in args.backends:
        row = rows[name] = Row(name, NOTES[name])
        started = time.perf_counter()
        try:
            with torch.no_grad():
                predict = BUILDERS[name](model, calibration)
            # First calls, in the inference mode the timing and the engine use (a compiled graph is
            # guarded on it): compilation, kernel selection, weight prepacking.
            with torch.inference_mode():
                for size in args.batch_sizes:
                    predict(inputs[size])
        except BackendUnavailable as reason:
            row.skipped = str(reason)
            print(f"{name}: skipped, {reason}", flush=True)
            continue
        row.startup_s = time.perf_counter() - started
        predictors[name] = predict
        print(f"{name}: ready in {row.startup_s:.1f} s", flush=True)

    reference = logits_of(predictors["fp32"], evaluation)
    for name, predict in predictors.items():
        outputs = logits_of(predict, evaluation)
        probabilities, row = outputs.softmax(dim=1), rows[name]
        row.agreement = (outputs.argmax(1) == reference.argmax(1)).float().mean().item()
        row.max_probability_diff = (probabilities - reference.softmax(dim=1)).abs().max().item()
        row.min_logit_cosine = nn.functional.cosine_similarity(outputs, reference).min().item()
        if args.weights:
            row.accuracy = (probabilities.argmax(1) == labels).float().mean().item()

    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, predict in predictors.items():
            for size in args.batch_sizes:
                rows[name].rounds.setdefault(size, []).append(
                    throughput(predict, inputs[size], args.seconds, args.passes))
    for row in rows.values():
        row.images_per_s = {size: statistics.median(values) for size, values in row.rounds.items()}
    return {
        "benchmark": "cpu_backends",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).parent.parent.name + "/bin/python -m benchmarks.cpu_backends",
                             *sys.argv[1:]]),
        "machine": machine,
        "model": {"architecture": args.architecture if not args.weights else card.architecture,
                  "weights": weights},
        "settings": {"torch_threads": args.threads, "passes": args.passes, "rounds": args.rounds,
                     "seconds_per_measurement": args.seconds, "eval_images": len(evaluation),
                     "calibration_images": len(calibration), "batch_sizes": args.batch_sizes},
        "load_average_1min": {"before_timing": load_before, "after_timing": os.getloadavg()[0]},
        "quality": "accuracy" if args.weights else "agreement with fp32 (random-init weights: not accuracy)",
        # A random-init network answers nearly one class for every image, which makes top-1 agreement easy:
        # how many classes fp32 predicts says how much the agreement column can tell.
        "fp32_distinct_top1_classes": int(reference.argmax(1).unique().numel()),
        "rows": [row.__dict__ for row in rows.values()],
    }


def wait_for_quiet(threshold: float, max_wait: float) -> bool:
    """Wait until the machine's 1-minute load average is below ``threshold``; False if it never was."""
    deadline = time.monotonic() + max_wait
    while (load := os.getloadavg()[0]) >= threshold:
        if time.monotonic() > deadline:
            print(f"load average still {load:.2f} after {max_wait:.0f} s: timing anyway; figures are noisy",
                  flush=True)
            return False
        print(f"load average {load:.2f} >= {threshold}: waiting for a quieter machine", flush=True)
        time.sleep(15)
    return True


def table(result: dict) -> str:
    sizes = result["settings"]["batch_sizes"]
    accuracy = result["quality"] == "accuracy"
    fp32 = next((row for row in result["rows"] if row["backend"] == "fp32"), None)
    head = ["backend", "start-up s", *[f"b{size} img/s" for size in sizes], "× fp32 b" + str(sizes[-1]),
            "top-1 agree", "max |Δp|", "min cos"] + (["accuracy", "Δ points"] if accuracy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if row["skipped"]:
            lines.append(f"| {row['backend']} | skipped: {row['skipped']} |")
            continue
        speeds = [row["images_per_s"][size] for size in sizes]
        ratio = speeds[-1] / fp32["images_per_s"][sizes[-1]] if fp32 and not fp32["skipped"] else float("nan")
        cells = [row["backend"], f"{row['startup_s']:.1f}", *[f"{speed:.1f}" for speed in speeds], f"{ratio:.2f}",
                 _percent(row["agreement"]), _number(row["max_probability_diff"]),
                 "—" if row["min_logit_cosine"] is None else f"{row['min_logit_cosine']:.4f}"]
        if accuracy:
            delta = (row["accuracy"] - fp32["accuracy"]) * 100 if fp32 and fp32["accuracy"] is not None else None
            cells += [_percent(row["accuracy"]), "—" if delta is None else f"{delta:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}"


def main(argv: list[str] | None = None) -> None:
    cores = describe_machine()["cores"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="checkpoint directory; without it, a seeded random init")
    parser.add_argument("--architecture", default="resnet50", help="without --weights (default resnet50)")
    parser.add_argument("--seed", type=int, default=0, help="of the random init (default 0)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache" / "cifar10",
                        help="folder holding cifar-10-batches-py/ (default .cache/cifar10)")
    parser.add_argument("--backends", nargs="+", default=list(BUILDERS), choices=list(BUILDERS),
                        help="default: all; fp32 is the reference for agreement and the × column")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=cores, help=f"torch intra-op threads (default {cores})")
    parser.add_argument("--passes", type=int, default=1,
                        help="forward passes run at once, each from its own thread (default 1; the engine "
                             "runs one single-threaded pass per core: --threads 1 --passes CORES)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; median kept")
    parser.add_argument("--seconds", type=float, default=1.5, help="per backend, batch size and round")
    parser.add_argument("--eval-images", type=int, default=1000,
                        help="test images for agreement/accuracy (default 1000; 10000 for a real accuracy)")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images for int8")
    parser.add_argument("--quiet-load", type=float, default=0.7,
                        help="wait until the 1-minute load average is below this before timing (default 0.7)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for that (default 600)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/cpu_backends-<time>.json)")
    args = parser.parse_args(argv)
    # Inductor's freezing constant-folds the weights and prepacks them for oneDNN: most of its CPU
    # speed-up, and what lowers the int8 graph's qconv_prepack ops at all. (Passed as
    # torch.compile(options=...) it does not reach the PT2E graph's lowering; the global switch does.)
    torch._inductor.config.freezing = True
    if "fp32" not in args.backends:
        args.backends.insert(0, "fp32")
    # A cold inductor cache, so the start-up column is what a fresh machine pays.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    wait_for_quiet(args.quiet_load, args.max_wait)
    result = run(args)
    text = table(result)
    print()
    print(f"{result['model']['architecture']} ({result['model']['weights']}) on {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores, torch {torch.__version__}; {args.threads} threads × "
          f"{args.passes} pass(es); {result['quality']} on {result['settings']['eval_images']} test images, "
          f"on which fp32 predicts {result['fp32_distinct_top1_classes']} distinct classes")
    print(text)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"cpu_backends-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")


if __name__ == "__main__":
    main()
