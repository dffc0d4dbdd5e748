"""Serving on the GPU: offline bf16 throughput for batch 1..1024, then HTTP /predict and /predict/batch.

    python -m benchmarks.gpu.serve_gpu --weights RUN/checkpoint --out serve.json

Run by benchmarks/gpu/run.sh on the GPU machine; on a CPU it runs too (tiny settings) as a rehearsal. The phases go
in the order of what the targets ask (issue 26): offline images/s; single-image /predict with batching on at
concurrency 256 first, then lower; /predict/batch on that same service; more uvicorn workers at the highest
concurrency; batching off. The JSON is rewritten after every phase, so a run stopped by its time limit keeps what
it measured. The load generator is benchmarks/gpu/socket_load.py (raw keep-alive sockets over several processes),
since the httpx generator of benchmarks/load.py cannot offer the ~10k requests/s one H100 can answer.
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

from benchmarks.gpu.server import service
from benchmarks.gpu.socket_load import multipart, run_load
from benchmarks.serve_load import describe_machine, offline_throughput, test_image


def client_processes(concurrency: int) -> int:
    """Enough client processes that the load generator is not the limit, leaving cores to the server."""
    return max(1, min(concurrency // 32, (os.cpu_count() or 2) // 2))


def load_levels(url: str, levels: list[int], args: argparse.Namespace, path: str, body: bytes, content_type: str,
                label: str, workers: int) -> list[dict]:
    host, port = url.removeprefix("http://").split(":")
    rows = []
    for concurrency in levels:
        result = run_load(host, int(port), path, body, content_type, concurrency=concurrency,
                          duration=args.duration, warmup=args.warmup, processes=client_processes(concurrency))
        row = {"config": label, "workers": workers, **dataclasses.asdict(result)}
        rows.append(row)
        print(f"  {label:<28} workers {workers} c={concurrency:>4}: {result.requests_per_s:9.1f} req/s  "
              f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}", flush=True)
    return rows


def batch_body(files: int) -> tuple[bytes, str]:
    """One multipart body of ``files`` random 32x32 PNGs under the field name ``files``."""
    rng = np.random.default_rng(0)
    parts = []
    content_type = ""
    for index in range(files):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        part, content_type = multipart("files", f"{index}.png", buffer.getvalue(), "image/png")
        parts.append(part)
    boundary = content_type.partition("boundary=")[2].encode()
    # Every part but the last loses its closing delimiter.
    closing = b"\r\n--" + boundary + b"--\r\n"
    return b"\r\n".join(part[: -len(closing)] for part in parts) + closing, content_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint directory to serve")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offline-batches", type=int, nargs="+", default=[2 ** k for k in range(11)])
    parser.add_argument("--offline-seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256, 64, 16, 1],
                        help="single-image /predict with batching on, in this order (the target's level first)")
    parser.add_argument("--workers", type=int, nargs="+", default=[4],
                        help="more uvicorn workers, tried with batching on at the first concurrency")
    parser.add_argument("--batching-off-concurrency", type=int, nargs="+", default=[256, 1])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--batch-files", type=int, default=64, help="images per /predict/batch request")
    parser.add_argument("--batch-concurrency", type=int, default=16, help="/predict/batch requests in flight")
    parser.add_argument("--ready-timeout", type=float, default=90, help="seconds a service may take to get ready")
    parser.add_argument("--log-dir", type=Path, default=None, help="where the services' logs go")
    args = parser.parse_args()

    device = torch.device(args.device)
    results: dict = {"machine": describe_machine(), "device": str(device), "weights": str(args.weights),
                     "settings": {key: str(value) for key, value in vars(args).items()}}

    def save(phase: str) -> None:
        results["phases_done"] = [*results.get("phases_done", []), phase]
        results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"offline, {device}:", flush=True)
    # The engine's own thread plan (0 = automatic), and one attempt: the GPU machine runs nothing else.
    offline = argparse.Namespace(offline_seconds=args.offline_seconds, torch_threads=0, parallel_batches=0,
                                 attempts=1, quiet_cores=float("inf"), max_wait=0)
    results["offline_images_per_s"] = offline_throughput(args.weights, device, args.offline_batches, offline)
    if device.type == "cuda":
        results["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.empty_cache()  # the services below are other processes on the same GPU
    save("offline")

    image, source = test_image()
    results["image"] = source
    body, content_type = multipart("file", "image.png", image, "image/png")
    base = {"APP_DEVICE": args.device, "APP_MAX_QUEUE": "8192", "APP_MAX_BATCH_FILES": str(args.batch_files)}
    batching = base | {"APP_MAX_BATCH_SIZE": str(args.max_batch_size), "APP_MAX_BATCH_DELAY_MS": "2"}
    start = dict(ready_timeout_s=args.ready_timeout, log_dir=args.log_dir)
    results["http_predict"] = []
    with service(args.weights, batching, **start) as (url, _pid):
        results["http_predict"] += load_levels(url, args.concurrency, args, "/predict", body, content_type,
                                               "batching on", 1)
        save("predict, batching on")
        files_body, files_type = batch_body(args.batch_files)
        rows = load_levels(url, [args.batch_concurrency], args, "/predict/batch", files_body, files_type,
                           f"/predict/batch x{args.batch_files}", 1)
        for row in rows:
            row["images_per_s"] = row["requests_per_s"] * args.batch_files
            print(f"  /predict/batch: {row['images_per_s']:.0f} images/s", flush=True)
        results["http_predict_batch"] = rows
        save("predict/batch")
    for workers in [w for w in args.workers if w > 1]:
        with service(args.weights, batching, workers=workers, **start) as (url, _pid):
            results["http_predict"] += load_levels(url, args.concurrency[:1], args, "/predict", body, content_type,
                                                   "batching on", workers)
        save(f"predict, {workers} workers")
    with service(args.weights, base | {"APP_MAX_BATCH_SIZE": "1"}, **start) as (url, _pid):
        results["http_predict"] += load_levels(url, args.batching_off_concurrency, args, "/predict", body,
                                               content_type, "batching off (max batch 1)", 1)
    save("predict, batching off")


if __name__ == "__main__":
    main()
