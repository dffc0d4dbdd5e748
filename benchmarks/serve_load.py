"""Serving throughput and latency under load, against the offline limit of the same model on the same machine.

    .venv/bin/python -m benchmarks.serve_load --max-wait 1800       # ~10 min: 2 rounds x 2 servers x 4 levels
    .venv/bin/python -m benchmarks.serve_load --duration 5 --rounds 1 --concurrency 1 64   # a quick look

What it does, in one run:

1. Writes a random-init resnet50 checkpoint (speed does not depend on the weights) to a temporary folder.
2. Measures the offline limit: the engine's own model preparation (``ServedModel``), the service's thread
   plan for this machine, images/s at batch sizes 1, 8, 32 and 64, no HTTP, no decoding.
3. Starts the service (``python -m app``, a real uvicorn process) twice, with batching on (the service's
   automatic ``APP_MAX_BATCH_SIZE``, 16 on the CPU) and with ``APP_MAX_BATCH_SIZE=1``, and at each concurrency level
   runs a closed-loop httpx load generator for ``--duration`` seconds after a warm-up: every client posts the
   same real CIFAR-10 test image (a PNG of ``test_batch`` image 0 when ``.cache/cifar10`` holds the data set,
   else a generated PNG) to ``/predict`` as soon as its previous answer arrives.

The load generator runs on the same machine as the server, so it competes with it for the CPU: the served
figures are a lower bound, and the CPU time each side used is recorded. Steps 2 and 3 are repeated
``--rounds`` times and each figure keeps its best round, since load from other processes on a shared machine
only ever lowers throughput; ``--max-wait`` holds the offline runs and each server start until the CPUs are
idle, and the 1-minute load average is saved too. Writes
``benchmarks/results/serve_load_<device>.json``, which holds the printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import pickle
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from app.engine.device import apply_thread_plan, plan_threads, resolve_batch_size
from app.engine.served_model import ServedModel
from model.architectures import build_model
from model.checkpoint import save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
CIFAR_TEST_BATCH = REPO_ROOT / ".cache" / "cifar10" / "cifar-10-batches-py" / "test_batch"


def describe_machine() -> dict:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def test_image() -> tuple[bytes, str]:
    """A real CIFAR-10 test image as PNG, or a generated one where the data set is not unpacked."""
    if CIFAR_TEST_BATCH.is_file():
        with open(CIFAR_TEST_BATCH, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        pixels = np.asarray(batch["data"][0], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
        source = "CIFAR-10 test_batch image 0"
    else:
        y, x = np.mgrid[0:32, 0:32]
        pixels = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
        source = "generated 32x32 gradient (no .cache/cifar10)"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), source


def make_checkpoint(directory: Path, architecture: str) -> Path:
    torch.manual_seed(0)
    save_checkpoint(build_model(architecture), directory, architecture=architecture)
    return directory


def offline_throughput(checkpoint: Path, device: torch.device, batch_sizes: list[int], args: argparse.Namespace
                       ) -> dict[int, dict]:
    """Images/s of the served model alone, run the way the engine runs it: ``parallel_batches`` threads,
    each doing forward passes of one batch size back to back. A measurement during which other processes
    used the CPU is repeated (see ``measured``)."""
    plan = plan_threads(device, args.torch_threads, args.parallel_batches)
    apply_thread_plan(plan)
    model = ServedModel.load(checkpoint, device)
    results = {}
    with ThreadPoolExecutor(plan.parallel_batches) as streams:
        for batch_size in batch_sizes:
            pixels = torch.zeros((batch_size, 32, 32, 3), dtype=torch.uint8, device=device)
            model.warm_up([batch_size, batch_size])

            def run(pixels: torch.Tensor = pixels) -> dict:
                usage = CpuUsage(os.getpid())
                started = time.perf_counter()
                runs = [streams.submit(images_until, model, pixels, started + args.offline_seconds)
                        for _ in range(plan.parallel_batches)]
                images = sum(run.result() for run in runs)
                return {"images_per_s": images / (time.perf_counter() - started)} | usage.cores(server=None)

            results[batch_size] = measured(run, "images_per_s", args)
            print(f"  offline batch {batch_size:>3}: {results[batch_size]['images_per_s']:7.1f} images/s", flush=True)
    return results


def images_until(model: ServedModel, pixels: torch.Tensor, until: float) -> int:
    """Forward passes of ``pixels`` back to back until ``until``; how many images they computed."""
    done = 0
    while time.perf_counter() < until:
        model.logits(model.normalise(pixels))
        done += len(pixels)
    return done


@contextmanager
def service(checkpoint: Path | None, environment: dict[str, str], workers: int = 1):
    """``python -m app`` on a free port serving ``checkpoint`` (None: the service's own default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    env |= ({"APP_WEIGHTS": str(checkpoint)} if checkpoint is not None else {}) | environment
    # Logs stay at the default level (one JSON line per request, as in production), written to a file.
    with tempfile.NamedTemporaryFile(prefix=f"serve_load-{port}-", suffix=".log", delete=False) as log:
        process = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--workers", str(workers)],
                                   cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode}; its log: {log.name}")
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready in 300 s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


CONNECTIONS_PER_CLIENT = 8  # httpcore scans its whole pool on every request: small pools keep that cheap


async def load_level(url: str, image: bytes, concurrency: int, duration: float, warmup: float,
                     server_pid: int) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next request when its answer arrives.

    The clients share httpx.AsyncClients of 8 connections each (one pool of 64 made every request scan 64
    connections: 2.5 ms of client CPU per request instead of 1). The CPU time that the load generator and
    the server used while measuring is recorded, since both share this machine's cores."""
    latencies: list[float] = []
    errors = 0
    measuring = False
    pools = [httpx.AsyncClient(base_url=url, timeout=120,
                               limits=httpx.Limits(max_connections=CONNECTIONS_PER_CLIENT))
             for _ in range(-(-concurrency // CONNECTIONS_PER_CLIENT))]

    async def one_client(pool: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal errors
        request = pool.build_request("POST", "/predict", content=image, headers={"content-type": "image/png"})
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await pool.send(request)
            if measuring:
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    stop_at = time.perf_counter() + warmup + duration
    clients = [asyncio.create_task(one_client(pools[n // CONNECTIONS_PER_CLIENT], stop_at))
               for n in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring, measured_from = True, time.perf_counter()
    usage = CpuUsage(os.getpid(), server_pid)
    await asyncio.gather(*clients)
    elapsed = time.perf_counter() - measured_from
    cpu = usage.cores(server=server_pid)
    for pool in pools:
        await pool.aclose()
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": quantiles[49] * 1000,
            "p90_ms": quantiles[89] * 1000, "p99_ms": quantiles[98] * 1000} | cpu


class CpuUsage:
    """CPU cores used, from now until ``cores()``, by this process, the server, and everything else on the
    machine (from /proc): "others" above a few percent means the measurement shared the machine."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.started = time.perf_counter()
        self.before = {pid: process_cpu_seconds(pid) for pid in pids}
        self.machine = cpu_times()

    def cores(self, server: int | None) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        used = {pid: (process_cpu_seconds(pid) - self.before[pid]) / elapsed for pid in self.pids}
        machine = cpu_times()
        busy = (machine[0] - self.machine[0]) / os.sysconf("SC_CLK_TCK") / elapsed
        ours = {"load_generator_cpu_cores" if server is not None else "benchmark_cpu_cores": used[os.getpid()]}
        if server is not None:
            ours["server_cpu_cores"] = used[server]
        return ours | {"other_processes_cpu_cores": max(0.0, busy - sum(used.values()))}


def measured(run: Callable[[], dict], key: str, args: argparse.Namespace) -> dict:
    """``run()`` until other processes used under ``--quiet-cores`` of CPU meanwhile (at most ``--attempts``
    times, waiting for a quiet machine in between); the attempt with the highest ``key`` is kept."""
    attempts = []
    for _ in range(args.attempts):
        attempts.append(run())
        if attempts[-1]["other_processes_cpu_cores"] <= args.quiet_cores:
            break
        print(f"  (other processes used {attempts[-1]['other_processes_cpu_cores']:.2f} cores: measuring again)",
              flush=True)
        wait_until_idle(args.max_wait)
    return max(attempts, key=lambda attempt: attempt[key]) | {"attempts": len(attempts)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(result: dict) -> str:
    offline = {size: run["images_per_s"] for size, run in result["offline_images_per_s"].items()}
    best = max(offline.values())
    lines = [("| server | concurrency | requests/s | p50 ms | p90 ms | p99 ms | errors | vs offline best "
              "| CPU cores: server, load generator, others |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, levels in result["served"].items():
        for level in levels:
            lines.append(f"| {name} | {level['concurrency']} | {level['requests_per_s']:.1f} | {level['p50_ms']:.0f} "
                         f"| {level['p90_ms']:.0f} | {level['p99_ms']:.0f} | {level['errors']} "
                         f"| {level['requests_per_s'] / best:.2f} "
                         f"| {level['server_cpu_cores']:.2f}, {level['load_generator_cpu_cores']:.2f}, "
                         f"{level['other_processes_cpu_cores']:.2f} |")
    lines.append("")
    lines.append("| offline batch size | " + " | ".join(str(b) for b in offline) + " |")
    lines.append("|---|" + "---:|" * len(offline))
    lines.append("| images/s | " + " | ".join(f"{v:.1f}" for v in offline.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per level (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batch-size", type=int, default=0,
                        help="APP_MAX_BATCH_SIZE with batching on (default 0: the service's automatic size)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat everything, keep each figure's best round")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--torch-threads", type=int, default=0, help="APP_TORCH_THREADS (0: the service's plan)")
    parser.add_argument("--parallel-batches", type=int, default=0, help="APP_PARALLEL_BATCHES (0: the plan)")
    parser.add_argument("--offline-seconds", type=float, default=8.0)
    parser.add_argument("--max-wait", type=float, default=0.0,
                        help="before the offline runs and each server, wait up to this many seconds for the CPUs "
                             "to be 90%% idle")
    parser.add_argument("--attempts", type=int, default=3, help="tries per measurement while others use the CPU")
    parser.add_argument("--quiet-cores", type=float, default=0.15,
                        help="CPU cores other processes may use during a measurement that counts as quiet")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image, source = test_image()
    batch_size = resolve_batch_size(device, args.batch_size)
    threads = {"APP_TORCH_THREADS": str(args.torch_threads), "APP_PARALLEL_BATCHES": str(args.parallel_batches),
               "APP_DEVICE": device.type}
    servers = {f"batching (max {batch_size})": {"APP_MAX_BATCH_SIZE": str(batch_size)},
               "no batching (max 1)": {"APP_MAX_BATCH_SIZE": "1"}}
    load_before = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_checkpoint(Path(folder) / args.architecture, args.architecture)
        # Offline and served figures alternate round by round, so load from other processes on a shared
        # machine falls on both; each figure keeps its best round (load only ever lowers throughput).
        for number in range(1, args.rounds + 1):
            wait_until_idle(args.max_wait)
            print(f"round {number}: offline {args.architecture} on {device}", flush=True)
            offline = offline_throughput(checkpoint, device, sorted({1, 8, 32, 64, batch_size}), args)
            served: dict[str, list[dict]] = {}
            for name, environment in servers.items():
                wait_until_idle(args.max_wait)
                with service(checkpoint, environment | threads) as (url, pid):
                    served[name] = [run_level(name, url, image, concurrency, args, pid)
                                    for concurrency in args.concurrency]
            rounds.append({"offline_images_per_s": offline, "served": served, "load_average_1min": os.getloadavg()[0]})
    offline = {size: max((r["offline_images_per_s"][size] for r in rounds), key=lambda run: run["images_per_s"])
               for size in rounds[0]["offline_images_per_s"]}
    served = {name: [max((r["served"][name][i] for r in rounds), key=lambda level: level["requests_per_s"])
                     for i in range(len(args.concurrency))] for name in servers}
    best_served = max(level["requests_per_s"] for levels in served.values() for level in levels)
    result = {
        "benchmark": "serve_load",
        "machine": describe_machine(),
        "device": str(device),
        "architecture": args.architecture,
        "image": source,
        "thread_plan": dataclasses.asdict(plan_threads(device, args.torch_threads, args.parallel_batches)),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "offline_images_per_s": offline,
        "served": served,
        "best_served_over_offline_best": best_served / max(run["images_per_s"] for run in offline.values()),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "every_round": rounds,
        "command": "python -m benchmarks.serve_load " + " ".join(sys.argv[1:]),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result["table"] = table(result)
    print(result["table"])
    print(f"best served / offline best: {result['best_served_over_offline_best']:.3f}")
    output = args.output or RESULTS / f"serve_load_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


def wait_until_idle(max_wait: float, idle: float = 0.9) -> None:
    """Wait (up to ``max_wait`` s) until the machine's CPUs were ``idle`` idle over a 3-second sample."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = cpu_times()
        time.sleep(3)
        after = cpu_times()
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and 1 - busy / total >= idle:
            return
        print(f"  waiting for a quiet machine ({1 - busy / total:.0%} idle)", flush=True)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def run_level(name: str, url: str, image: bytes, concurrency: int, args: argparse.Namespace, pid: int) -> dict:
    level = measured(lambda: asyncio.run(load_level(url, image, concurrency, args.duration, args.warmup, pid)),
                     "requests_per_s", args)
    print(f"  {name}, concurrency {concurrency:>2}: {level['requests_per_s']:6.1f} requests/s, "
          f"p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, CPU cores: server "
          f"{level['server_cpu_cores']:.2f}, load generator {level['load_generator_cpu_cores']:.2f}, others "
          f"{level['other_processes_cpu_cores']:.2f}", flush=True)
    return level


if __name__ == "__main__":
    main()
