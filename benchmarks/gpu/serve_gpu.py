"""Serving on the GPU: offline bf16 throughput for batch 1..1024, then HTTP /predict at several
concurrencies with batching on and off and with 1 or more uvicorn workers, then /predict/batch images/s.

    python -m benchmarks.gpu.serve_gpu --weights RUN/checkpoint --out results.json

Run by benchmarks/gpu/run.sh on the GPU machine; on a CPU it runs too (tiny settings) as a dry run. The
load generator is benchmarks/gpu/socket_load.py (raw keep-alive sockets over several processes), since
the httpx generator of benchmarks/load.py cannot offer the ~10k requests/s one H100 can answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.gpu.socket_load import multipart, run_load
from benchmarks.serve_load import describe_machine, offline_throughput, service, test_image


def client_processes(concurrency: int) -> int:
    """Enough client processes that the load generator is not the limit, leaving cores to the server."""
    return max(1, min(concurrency // 32, (os.cpu_count() or 2) // 2))


def http_levels(checkpoint: Path, environment: dict, workers: int, levels: list[int], duration: float,
                path: str, body: bytes, content_type: str, label: str) -> list[dict]:
    rows = []
    with service(checkpoint, environment, workers=workers) as (url, _pid):
        host, port = url.removeprefix("http://").split(":")
        for concurrency in levels:
            result = run_load(host, int(port), path, body, content_type, concurrency=concurrency,
                              duration=duration, processes=client_processes(concurrency))
            row = {"config": label, "workers": workers, **dataclasses.asdict(result)}
            rows.append(row)
            print(f"  {label:<28} workers {workers} c={concurrency:>4}: {result.requests_per_s:9.1f} req/s  "
                  f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint directory to serve")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offline-batches", type=int, nargs="+", default=[2 ** k for k in range(11)])
    parser.add_argument("--offline-seconds", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                        help="uvicorn worker counts tried with batching on at the highest concurrency")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--batch-files", type=int, default=64, help="images per /predict/batch request")
    args = parser.parse_args()

    device = torch.device(args.device)
    results: dict = {"machine": describe_machine(), "device": str(device), "weights": str(args.weights)}
    print(f"offline, {device}:", flush=True)
    # The engine's own thread plan (0 = automatic), and one attempt: the GPU machine runs nothing else.
    offline = argparse.Namespace(offline_seconds=args.offline_seconds, torch_threads=0, parallel_batches=0,
                                 attempts=1, quiet_cores=float("inf"), max_wait=0)
    results["offline_images_per_s"] = offline_throughput(args.weights, device, args.offline_batches, offline)
    if device.type == "cuda":
        results["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20

    image, source = test_image()
    results["image"] = source
    body, content_type = multipart("file", "image.png", image, "image/png")
    base = {"APP_DEVICE": args.device, "APP_MAX_QUEUE": "8192", "APP_MAX_BATCH_FILES": str(args.batch_files)}
    batching = base | {"APP_MAX_BATCH_SIZE": str(args.max_batch_size), "APP_MAX_BATCH_DELAY_MS": "2"}
    rows = http_levels(args.weights, batching, 1, args.concurrency, args.duration, "/predict", body,
                       content_type, "batching on")
    rows += http_levels(args.weights, base | {"APP_MAX_BATCH_SIZE": "1"}, 1, args.concurrency, args.duration,
                        "/predict", body, content_type, "batching off (max batch 1)")
    for workers in [w for w in args.workers if w > 1]:
        rows += http_levels(args.weights, batching, workers, [max(args.concurrency)], args.duration,
                            "/predict", body, content_type, "batching on")
    results["http_predict"] = rows

    rng = np.random.default_rng(0)
    parts = []
    for index in range(args.batch_files):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        part, boundary_type = multipart("files", f"{index}.png", buffer.getvalue(), "image/png")
        parts.append(part)
    boundary = boundary_type.partition("boundary=")[2].encode()
    # One multipart body holding every file: drop each part's closing delimiter but the last.
    closing = b"\r\n--" + boundary + b"--\r\n"
    batch_body = b"\r\n".join(part[: -len(closing)] for part in parts) + closing
    batch_rows = http_levels(args.weights, batching, 1, [16], args.duration, "/predict/batch", batch_body,
                             boundary_type, f"/predict/batch x{args.batch_files}")
    for row in batch_rows:
        row["images_per_s"] = row["requests_per_s"] * args.batch_files
        print(f"  /predict/batch: {row['images_per_s']:.0f} images/s", flush=True)
    results["http_predict_batch"] = batch_rows
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
