"""Requests/s and latency of one image per request through each way in: REST multipart (``/predict``), KServe v2
with JSON tensors, KServe v2 with binary tensors (tritonclient's default) and KServe v2 over gRPC, on one
server, one model and one machine, in one run.

    .venv/bin/python -m benchmarks.serve_protocols                       # ~1.5 min: 4 ways x 4 levels x 4 s
    .venv/bin/python -m benchmarks.serve_protocols --duration 10 --concurrency 1 64

One ``python -m app`` (the shipped checkpoint unless ``--weights``, its default CPU backend, gRPC on a port of
its own) answers every cell. The image is ``examples/cat.png``: the PNG for multipart, its pixels
(``UINT8 [1, 32, 32, 3]``) for the tensors. At each concurrency level the four ways run one after another
(``benchmarks/load.py``: closed-loop clients, each answer checked, ``--warmup`` then ``--duration`` seconds),
so load from other processes on a shared machine falls on all four alike. The load generator runs on the same
machine and its CPU time is recorded beside the server's. Writes ``benchmarks/results/serve_protocols_<device>.json``,
which holds the printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.compare import wait_until_serving
from benchmarks.load import (
    LevelResult,
    Upload,
    V2Request,
    app_service,
    check_v2_answer,
    drive,
    drive_grpc,
    v2_grpc_request,
)
from benchmarks.serve_load import describe_machine

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
IMAGE = REPO_ROOT / "examples" / "cat.png"
WAYS = ("REST multipart", "v2 JSON", "v2 binary", "v2 gRPC")


async def run_cell(way: str, url: str, grpc_address: str, model: str, concurrency: int, args: argparse.Namespace,
                   pid: int) -> LevelResult:
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"))[None]
    timing = {"concurrency": concurrency, "duration": args.duration, "warmup": args.warmup, "server_pid": pid}
    infer = f"{url}/v2/models/{model}/infer"
    if way == "REST multipart":
        return await drive(f"{url}/predict", Upload(IMAGE.read_bytes(), "cat.png"), **timing)
    if way == "v2 JSON":
        return await drive(infer, V2Request(pixels, binary=False), check=check_v2_answer, **timing)
    if way == "v2 binary":
        return await drive(infer, V2Request(pixels, binary=True), check=check_v2_answer, **timing)
    return await drive_grpc(grpc_address, v2_grpc_request(pixels, model), **timing)


def table(cells: dict[str, list[dict]]) -> str:
    lines = ["| way in | concurrency | requests/s | p50 ms | p99 ms | errors | CPU cores: server, load generator |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for way, levels in cells.items():
        for level in levels:
            lines.append(f"| {way} | {level['concurrency']} | {level['requests_per_s']:.1f} | {level['p50_ms']:.1f} "
                         f"| {level['p99_ms']:.1f} | {level['error_count']} | {level['server_cpu_cores']:.2f}, "
                         f"{level['load_generator_cpu_cores']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    settings = {"APP_DEVICE": "cpu", "APP_GRPC_PORT": str(grpc_port)}
    if args.weights is not None:
        settings["APP_WEIGHTS"] = str(args.weights)
    load_before = os.getloadavg()[0]
    cells: dict[str, list[dict]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as folder, app_service(settings, Path(folder) / "server.log", REPO_ROOT) as (
            url, pid):
        wait_until_serving(f"{url}/predict", Upload(IMAGE.read_bytes(), "cat.png"), pid)
        model = httpx.get(f"{url}/model").json()
        name = model["architecture"]
        for concurrency in args.concurrency:
            for way in WAYS:
                level = asyncio.run(run_cell(way, url, f"127.0.0.1:{grpc_port}", name, concurrency, args, pid))
                cells[way].append(level.as_dict())
                print(f"  {way:>14}, concurrency {concurrency:>2}: {level.requests_per_s:7.1f} requests/s, "
                      f"p50 {level.p50_ms:6.1f} ms, p99 {level.p99_ms:6.1f} ms, errors {level.error_count}",
                      flush=True)
    result = {
        "benchmark": "serve_protocols",
        "machine": describe_machine() | {"shared": "other work ran on the machine meanwhile (load average saved)"},
        "model": {key: model.get(key) for key in ("architecture", "version", "backend")},
        "image": "examples/cat.png, one per request",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "cells": cells,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "command": "python -m benchmarks.serve_protocols " + " ".join(sys.argv[1:] if argv is None else argv),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result["table"] = table(cells)
    print(result["table"])
    output = args.output or RESULTS / "serve_protocols_cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
