"""Our service against LitServe, BentoML and a plain FastAPI app, serving the same model on this machine.

    .venv-bench/bin/python -m benchmarks.compare                    # tunes the peers, then ~6 min of load
    .venv-bench/bin/python -m benchmarks.compare --knobs-from benchmarks/results/compare-<time>.json

Every server serves the same checkpoint (``--weights``, else a random-init resnet50: speed does not
depend on the weights); ours with its default backend (``APP_CPU_BACKEND=auto``: what the checkpoint's
verified report allows, else fused), the peers with ``--peer-backend`` (default fused; ``eager`` is the fp32
model their docs show), loaded through the service's own ``ServedModel``; the same image decoding and the
same JSON answer (``benchmarks/peers/common.py``). Each is started in turn on 127.0.0.1, warmed up, driven by the same
closed-loop generator (``benchmarks/load.py``: multipart upload of one real CIFAR-10 test image, the PNG
of test image 0) at each concurrency level for ``--duration`` seconds, and stopped.

Peers' knobs are tuned first (``--tune-duration`` seconds at concurrency 32 and 64 per setting; the one
with the most requests/s summed over both is kept) unless ``--knobs-from`` names an earlier run's
results, whose chosen knobs are reused so that repeated runs compare like with like. Ours runs with its
defaults. The offline limit is our model alone (no HTTP, no decoding) run the way the engine runs it.
All processes, the load generator included, share this machine's cores: the table is for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
from PIL import Image

from benchmarks.cpu_backends import (
    describe_machine,
    read_batch,
    throughput,
    wait_for_quiet,
)
from benchmarks.load import Upload, drive, server_process

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class ServerConfig:
    server: str  # ours, litserve, bentoml, fastapi
    knobs: dict[str, float] = field(default_factory=dict)
    peer_backend: str = "fused"  # PEER_CPU_BACKEND of a peer; ours runs its own default

    @property
    def label(self) -> str:
        return ", ".join(f"{name}={value:g}" for name, value in self.knobs.items()) or "defaults"

    def command(self, port: int) -> list[str]:
        if self.server == "ours":
            return [sys.executable, "-m", "app", "--port", str(port)]
        if self.server == "bentoml":
            return [str(BIN / "bentoml"), "serve", "benchmarks.peers.bentoml_service:CifarFront",
                    "--host", "127.0.0.1", "--port", str(port)]
        module = {"litserve": "litserve_server", "fastapi": "fastapi_plain"}[self.server]
        return [sys.executable, "-m", f"benchmarks.peers.{module}"]

    def environment(self, weights: Path, port: int, state: Path) -> dict[str, str]:
        base = {key: value for key, value in os.environ.items() if not key.startswith(("APP_", "PEER_"))}
        if self.server == "ours":
            return base | {"APP_WEIGHTS": str(weights), "APP_STATE_DIR": str(state), "APP_RUN_JOBS": "false",
                           "APP_REGISTRY_POLL_S": "0", "APP_LOG_LEVEL": "warning"}
        names = {"workers": "PEER_WORKERS", "threads": "PEER_TORCH_THREADS", "max_batch": "PEER_MAX_BATCH_SIZE",
                 "timeout_ms": "PEER_BATCH_TIMEOUT_MS", "max_latency_ms": "PEER_MAX_LATENCY_MS",
                 "fast_queue": "PEER_FAST_QUEUE"}
        knobs = {names[name]: f"{value:g}" for name, value in self.knobs.items()}
        return base | knobs | {"PEER_WEIGHTS": str(weights), "PEER_PORT": str(port),
                               "PEER_CPU_BACKEND": self.peer_backend, "BENTOML_DO_NOT_TRACK": "true",
                               "PYTHONPATH": str(REPO_ROOT)}


# Each peer's knob settings to try (2 cores: one model process with 2 threads, or two with 1 each).
TUNING: dict[str, list[dict[str, float]]] = {
    "fastapi": [{"workers": 1, "threads": 2}, {"workers": 2, "threads": 1}],
    # fast_queue: LitServe's ZeroMQ transport; its default (Manager queues) answered a lone request in ~1 s.
    "litserve": [{"workers": w, "threads": 2 // w, "max_batch": b, "timeout_ms": t, "fast_queue": 1}
                 for w in (1, 2) for b, t in ((16, 5), (32, 10))]
                + [{"workers": 1, "threads": 2, "max_batch": 16, "timeout_ms": 5, "fast_queue": 0}],
    "bentoml": [{"workers": w, "threads": 2 // w, "max_batch": b, "max_latency_ms": 10_000}
                for w in (1, 2) for b in (16, 32)],
}


@contextmanager
def running(config: ServerConfig, weights: Path, log: Path):
    """Start ``config``'s server on a free port, wait until it answers /predict, and stop it afterwards."""
    state = Path(tempfile.mkdtemp(prefix="compare_state_"))
    with server_process(lambda port: (config.command(port), config.environment(weights, port, state)), log,
                        REPO_ROOT) as (port, pid):
        yield f"http://127.0.0.1:{port}/predict", pid


def wait_until_serving(url: str, upload: Upload, pid: int, timeout: float = 300) -> float:
    """Seconds until the first good answer."""
    started = time.monotonic()
    body, headers = upload.encoded(url)
    while time.monotonic() - started < timeout:
        try:
            if httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"the server at {url} exited; see its log") from None
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} in {timeout:.0f} s; see its log")


def measure(config: ServerConfig, weights: Path, upload: Upload, levels: list[int], duration: float,
            log: Path) -> dict:
    print(f"{config.server} ({config.label})", flush=True)
    with running(config, weights, log) as (url, pid):
        startup = wait_until_serving(url, upload, pid)
        asyncio.run(drive(url, upload, concurrency=8, duration=3, warmup=0))  # warm-up: allocator, kernels
        results = []
        for concurrency in levels:
            level = asyncio.run(drive(url, upload, concurrency=concurrency, duration=duration, server_pid=pid))
            results.append(level.as_dict())
            print(f"  c={concurrency:>3}: {level.requests_per_s:6.1f} req/s  p50 {level.p50_ms:6.0f} ms  "
                  f"p99 {level.p99_ms:6.0f} ms  errors {level.error_count}  server CPU "
                  f"{level.server_cpu_cores:.2f} cores, generator {level.load_generator_cpu_cores:.2f}", flush=True)
    return {"server": config.server, "knobs": config.knobs, "startup_s": startup, "levels": results}


def tune(server: str, weights: Path, upload: Upload, duration: float, log: Path,
         peer_backend: str) -> tuple[ServerConfig, list]:
    trials = [measure(ServerConfig(server, knobs, peer_backend), weights, upload, [32, 64], duration, log)
              for knobs in TUNING[server]]
    best = max(trials, key=lambda trial: sum(level["requests_per_s"] for level in trial["levels"]))
    return ServerConfig(server, best["knobs"], peer_backend), trials


def offline_limit(weights: Path, batch_sizes: list[int], seconds: float) -> dict:
    """Our model alone, as the engine runs it (its thread plan, ServedModel), at each batch size."""
    from app.engine.device import apply_thread_plan, plan_threads
    from app.engine.served_model import ServedModel

    device = torch.device("cpu")
    plan = plan_threads(device)
    apply_thread_plan(plan)
    model = ServedModel.load(weights, device)
    figures = {}
    for size in batch_sizes:
        pixels = torch.zeros((size, 32, 32, 3), dtype=torch.uint8)
        model.warm_up([size])
        figures[size] = throughput(lambda batch: model.logits(model.normalise(batch)), pixels, seconds,
                                   plan.parallel_batches)
        print(f"offline, batch {size:>2}: {figures[size]:6.1f} images/s", flush=True)
    return {"backend": model.backend, "torch_threads": plan.torch_threads,
            "parallel_batches": plan.parallel_batches, "images_per_s": figures,
            "best_images_per_s": max(figures.values())}


def test_image(data_dir: Path) -> bytes:
    images, _ = read_batch(data_dir, "test_batch")
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def random_checkpoint(directory: Path) -> Path:
    from model.architectures import build_model
    from model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("resnet50"), directory, architecture="resnet50")
    return directory


def git_revision() -> str:
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=False)
    return described.stdout.strip() or "unknown"


def table(result: dict) -> str:
    ours = {level["concurrency"]: level for level in result["servers"][0]["levels"]}
    head = ["server", "knobs", "conc.", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "req/s ÷ ours",
            "p99 ÷ ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in result["servers"]:
        knobs = ", ".join(f"{name}={value:g}" for name, value in entry["knobs"].items()) or "defaults"
        for level in entry["levels"]:
            base = ours[level["concurrency"]]
            throughput = level["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else float("nan")
            p99 = level["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
            lines.append(f"| {entry['server']} | {knobs} | {level['concurrency']} | {level['requests_per_s']:.1f} | "
                         f"{level['p50_ms']:.0f} | {level['p90_ms']:.0f} | {level['p99_ms']:.0f} | "
                         f"{level['error_count']} | {throughput:.2f} | {p99:.2f} |")
    offline = result["offline"]
    lines.append("")
    lines.append(f"Offline model limit (ours, {offline['backend']}, {offline['parallel_batches']} passes × "
                 f"{offline['torch_threads']} thread): " + ", ".join(
                     f"batch {size}: {value:.1f}" for size, value in offline["images_per_s"].items())
                 + f" images/s; best {offline['best_images_per_s']:.1f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="checkpoint directory (default: a random-init resnet50)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache" / "cifar10",
                        help="folder holding cifar-10-batches-py/ (default .cache/cifar10)")
    parser.add_argument("--servers", nargs="+", default=["ours", "litserve", "bentoml", "fastapi"],
                        choices=["ours", "litserve", "bentoml", "fastapi"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=15, help="measured seconds per level (default 15)")
    parser.add_argument("--tune-duration", type=float, default=8, help="seconds per tuning level (default 8)")
    parser.add_argument("--knobs-from", type=Path, help="reuse the peers' knobs chosen in this results JSON")
    parser.add_argument("--quiet-load", type=float, default=0.7, help="wait for a 1-min load average below this")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for that (default 600)")
    parser.add_argument("--peer-backend", default="fused", help="the peers' CPU backend (PEER_CPU_BACKEND): "
                        "fused (default), eager = the fp32 model as trained, or any other of model.inference")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/compare-<time>.json)")
    args = parser.parse_args(argv)
    if "ours" in args.servers:
        args.servers.remove("ours")
    servers = ["ours", *args.servers]
    weights = args.weights or random_checkpoint(Path(tempfile.mkdtemp(prefix="compare_weights_")))
    upload = Upload(test_image(args.data_dir), filename="test_00000.png")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log = Path(tempfile.gettempdir()) / f"compare-{stamp}.log"
    print(f"server output goes to {log}", flush=True)

    chosen: dict[str, dict] = {}
    if args.knobs_from:
        earlier = json.loads(args.knobs_from.read_text())
        chosen = {entry["server"]: entry["knobs"] for entry in earlier["servers"] if entry["server"] != "ours"}
    quiet = wait_for_quiet(args.quiet_load, args.max_wait)
    machine = describe_machine()
    offline = offline_limit(weights, [1, 8, 16, 32], seconds=5)
    tuning: dict[str, list] = {}
    configs = [ServerConfig("ours")]
    for server in servers[1:]:
        if server not in chosen:
            config, tuning[server] = tune(server, weights, upload, args.tune_duration, log, args.peer_backend)
            chosen[server] = config.knobs
        configs.append(ServerConfig(server, chosen[server], args.peer_backend))
    entries = [measure(config, weights, upload, args.concurrency, args.duration, log) for config in configs]
    result = {
        "benchmark": "compare",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv-bench/bin/python -m benchmarks.compare", *sys.argv[1:]]),
        "machine": machine,
        "git": git_revision(),
        "quiet_at_start": quiet,
        "load_average_1min_at_end": os.getloadavg()[0],
        "weights": str(args.weights) if args.weights else "random-init resnet50 (seed 0)",
        "image": "CIFAR-10 test image 0 as PNG, multipart field 'file'",
        "duration_s": args.duration,
        "offline": offline,
        "peer_backend": args.peer_backend,
        "servers": entries,
        "tuning": tuning,
        "knobs_from": str(args.knobs_from) if args.knobs_from else None,
    }
    print()
    print(table(result))
    out = args.out or RESULTS / f"compare-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
