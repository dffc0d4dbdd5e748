"""Latency of ``POST /explain`` (a Grad-CAM heat map) next to ``POST /predict``, one request at a time.

    .venv/bin/python -m benchmarks.explain_latency                  # weights/fastcnn, 200 requests each
    .venv/bin/python -m benchmarks.explain_latency --requests 50     # a quick look

Starts the service as a user would (``python -m app``, a real uvicorn process, ``APP_WEIGHTS`` =
``--weights``, the default settings otherwise: calibration on, ``APP_EXPLAIN_CONCURRENCY=1``), then sends
examples/cat.png (a CIFAR-10 test image, 32x32 PNG) as multipart ``file`` from one httpx client over one
kept-alive connection: ``--warmup`` requests to each endpoint, then ``--requests`` measured ones, the
endpoints interleaved (predict, explain as PNG, explain as JSON, predict, ...) so that load from other
processes on a shared machine falls on all three alike. Each latency is the client's wall time from sending
the request to reading the whole answer. Sequential requests show what one explanation costs, not the
throughput under load (``benchmarks/serve_load.py`` measures that for /predict).

Writes ``benchmarks/results/explain_latency_<model version>.json`` (the machine, the load average, every
figure) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import describe_machine, service
from training.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
IMAGE = REPO_ROOT / "examples" / "cat.png"
ENDPOINTS = {"predict": "/predict", "explain_png": "/explain", "explain_json": "/explain?format=json"}


def summarise(latencies: list[float]) -> dict:
    milliseconds = np.array(latencies) * 1000
    return {"requests": len(latencies), "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
            "mean_ms": round(float(milliseconds.mean()), 2), "max_ms": round(float(milliseconds.max()), 2)}


def measure(url: str, image: bytes, requests: int, warmup: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    with httpx.Client(base_url=url, timeout=60) as client:
        for round_ in range(warmup + requests):
            for name, path in ENDPOINTS.items():
                started = time.perf_counter()
                response = client.post(path, files={"file": ("cat.png", image, "image/png")})
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
                if round_ >= warmup:
                    latencies[name].append(elapsed)
    return latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "weights" / "fastcnn")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per endpoint")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per endpoint first")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    image = IMAGE.read_bytes()
    with tempfile.TemporaryDirectory(prefix="explain_latency-") as state:
        with service(args.weights.resolve(), {"APP_STATE_DIR": state}) as (url, _):
            model = httpx.get(f"{url}/model").json()
            load_before = os.getloadavg()[0]
            latencies = measure(url, image, args.requests, args.warmup)
            load_after = os.getloadavg()[0]
    figures = {name: summarise(values) for name, values in latencies.items()}
    result = {
        "benchmark": "explain_latency",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": describe_machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "model_version": model["version"], "device": model["device"], "dtype": model["dtype"],
        "image": str(IMAGE.relative_to(REPO_ROOT)),
        "method": "one httpx client, one kept-alive connection, requests one at a time, endpoints interleaved; "
                  f"{args.warmup} warm-up requests each first; client wall time per request",
        "settings": "python -m app defaults (APP_CALIBRATION=on, APP_EXPLAIN_CONCURRENCY=1), APP_WEIGHTS="
                    f"{args.weights}",
        "endpoints": {name: {"path": ENDPOINTS[name], **figures[name]} for name in ENDPOINTS},
        "explain_over_predict_p50": round(figures["explain_png"]["p50_ms"] / figures["predict"]["p50_ms"], 2),
    }
    out = args.out or RESULTS / f"explain_latency_{model['version']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{model['version']} on {result['machine']['cpu']} ({model['device']}), {args.requests} sequential "
          f"requests each, load {load_before:.1f} -> {load_after:.1f}")
    print(f"{'endpoint':<28} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, path in ENDPOINTS.items():
        row = figures[name]
        print(f"{'POST ' + path:<28} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['mean_ms']:>8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
