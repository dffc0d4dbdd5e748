"""Do hot swaps pause inference? Latency under closed-loop load, with and without repeated model swaps.

    .venv/bin/python -m benchmarks.swap_under_load                          # weights/fastcnn, 30 s a phase
    .venv/bin/python -m benchmarks.swap_under_load --cpu-backend onnx --duration 20

Starts ``python -m app`` serving ``--weights`` (with ``APP_CPU_BACKEND=--cpu-backend``, default auto) and an
admin token, and drives it with ``--concurrency`` closed-loop clients (``benchmarks/load.py``: each posts
CIFAR-10 test image 0 as soon as its previous answer arrives) through phases of ``--duration`` seconds that
alternate without and with swaps, ``--rounds`` swapping phases each between two quiet ones (so a drift in the
machine's other load hits both kinds alike, and shows up as a difference between the quiet phases). During a
swapping phase a client posts ``POST /admin/reload`` back and forth between ``--weights`` and a copy of it
(its backend report and calibration set included, so each swap chooses and prepares the same backend anew),
a new swap ``--swap-every`` seconds after the previous one started (or as soon as it ends, if it took longer).

Reported per phase: answered requests, failed ones (any non-200, malformed answer, timeout, refused
connection; ``benchmarks/load.py`` counts them), requests/s, p50/p90/p99 latency; for the swapping phase the
swaps done and their seconds. The goal (issue 11): 0 failed, and p99 with swaps at most 2x p99 without
(``p99_ratio``: the mean p99 of the swapping phases over the quiet phases' mean). Every process shares the
machine's cores, the load generator and the swaps' preparation included: the figures are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.compare import git_revision, test_image, wait_until_serving
from benchmarks.cpu_backends import describe_machine
from benchmarks.load import LevelResult, Upload, app_service, drive

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
GOAL_P99_RATIO = 2.0


def service(weights: Path, backend: str, token: str, log: Path, other: Path):
    """``python -m app`` serving ``weights``, allowed to reload ``other`` too; yields its base URL and pid."""
    return app_service({"APP_WEIGHTS": str(weights), "APP_CPU_BACKEND": backend, "APP_ADMIN_TOKEN": token,
                        "APP_REGISTRY_POLL_S": "0", "APP_LOG_LEVEL": "warning",
                        "APP_RELOAD_ROOTS": json.dumps([str(other.parent)])}, log, REPO_ROOT)


async def swapping(base: str, token: str, checkpoints: list[Path], *, starts_at: float, stops_at: float,
                   every: float) -> list[dict]:
    """``POST /admin/reload`` to each of ``checkpoints`` in turn, a swap starting every ``every`` seconds
    between ``starts_at`` and ``stops_at`` (perf_counter times); one record per swap."""
    swaps: list[dict] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        await asyncio.sleep(max(0.0, starts_at - time.perf_counter()))
        while (started := time.perf_counter()) < stops_at:
            target = checkpoints[len(swaps) % len(checkpoints)]
            response = await client.post("/admin/reload", json={"weights": str(target)})
            body = response.json()
            swaps.append({"weights": str(target), "status": response.status_code,
                          "seconds": round(time.perf_counter() - started, 3),
                          "detail": None if response.status_code == 200 else body.get("detail")})
            await asyncio.sleep(max(0.0, started + every - time.perf_counter()))
    return swaps


async def swapping_phase(base: str, upload: Upload, token: str, checkpoints: list[Path],
                         args: argparse.Namespace, pid: int) -> tuple[LevelResult, list[dict]]:
    """The load of one phase, and meanwhile swaps from the start of its measured window to its end."""
    now = time.perf_counter()
    window = (now + args.warmup, now + args.warmup + args.duration)
    load, swaps = await asyncio.gather(
        drive(f"{base}/predict", upload, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup,
              server_pid=pid),
        swapping(base, token, checkpoints, starts_at=window[0], stops_at=window[1], every=args.swap_every))
    return load, swaps


def phase_record(name: str, level: LevelResult, swaps: list[dict] | None = None) -> dict:
    record = {"phase": name, **level.as_dict()}
    if swaps is not None:
        seconds = [swap["seconds"] for swap in swaps]
        record["swaps"] = swaps
        record["swap_count"] = len(swaps)
        record["swaps_failed"] = sum(swap["status"] != 200 for swap in swaps)
        record["swap_seconds_median"] = statistics.median(seconds) if seconds else None
    return record


def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="swap_under_load_"))
    copy = shutil.copytree(args.weights, workdir / f"{args.weights.name}-copy")
    token = secrets.token_urlsafe(32)
    upload = Upload(test_image(args.data_dir))
    log = workdir / "service.log"
    load_before = os.getloadavg()
    phases = []
    try:
        with service(args.weights.resolve(), args.cpu_backend, token, log, copy) as (base, pid):
            startup = wait_until_serving(f"{base}/predict", upload, pid)
            model = httpx.get(f"{base}/model", timeout=30).json()
            print(f"serving {model['version']} on {model['backend']}: {model['backend_reason']}", flush=True)
            asyncio.run(drive(f"{base}/predict", upload, concurrency=8, duration=3, warmup=0))  # allocator, kernels
            for number in range(2 * args.rounds + 1):
                name = f"{'with' if number % 2 else 'without'} swaps ({number // 2 + 1})"
                if number % 2:
                    level, swaps = asyncio.run(swapping_phase(base, upload, token, [copy, args.weights.resolve()],
                                                              args, pid))
                    phases.append(phase_record(name, level, swaps))
                else:
                    level = asyncio.run(drive(f"{base}/predict", upload, concurrency=args.concurrency,
                                              duration=args.duration, warmup=args.warmup, server_pid=pid))
                    phases.append(phase_record(name, level))
                print(line(phases[-1]), flush=True)
            after = httpx.get(f"{base}/model", timeout=30).json()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    quiet = statistics.mean(phase["p99_ms"] for phase in phases if "swaps" not in phase)
    swapped = [phase for phase in phases if "swaps" in phase]
    ratio = statistics.mean(phase["p99_ms"] for phase in swapped) / quiet if quiet else None
    failed = sum(phase["error_count"] for phase in phases)
    swaps_failed = sum(phase["swaps_failed"] for phase in swapped)
    return {
        "benchmark": "swap_under_load",
        "command": " ".join([".venv/bin/python -m benchmarks.swap_under_load", *sys.argv[1:]]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "machine": describe_machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {"weights": str(args.weights), "cpu_backend": args.cpu_backend, "concurrency": args.concurrency,
                     "duration_s": args.duration, "warmup_s": args.warmup, "swap_every_s": args.swap_every,
                     "rounds": args.rounds},
        "startup_s": round(startup, 1),
        "served": {"version": model["version"], "backend": model["backend"], "backend_reason": model["backend_reason"],
                   "after_swaps": {"backend": after["backend"], "origin": after["origin"]}},
        "phases": phases,
        "failed_requests": failed,
        "swaps": sum(phase["swap_count"] for phase in swapped),
        "swaps_failed": swaps_failed,
        "p99_without_swaps_ms": quiet,
        "p99_with_swaps_ms": statistics.mean(phase["p99_ms"] for phase in swapped),
        "p99_ratio": ratio,
        "goal": {"failed_requests": 0, "p99_ratio_at_most": GOAL_P99_RATIO,
                 "met": failed == 0 and swaps_failed == 0 and ratio is not None
                 and ratio <= GOAL_P99_RATIO},
    }


def line(phase: dict) -> str:
    text = (f"{phase['phase']:<18} {phase['requests']:>6} answered  {phase['error_count']} failed  "
            f"{phase['requests_per_s']:6.1f} req/s  p50 {phase['p50_ms']:6.1f} ms  p99 {phase['p99_ms']:6.1f} ms")
    if "swaps" in phase:
        text += (f"  ({phase['swap_count']} swaps, {phase['swaps_failed']} failed, median "
                 f"{phase['swap_seconds_median']} s each)")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "weights" / "fastcnn",
                        help="checkpoint directory (default weights/fastcnn); a copy of it is the other model")
    parser.add_argument("--cpu-backend", default="auto", help="APP_CPU_BACKEND of the service (default auto)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data",
                        help="folder holding cifar-10-batches-py/, for the test image (default data)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase (default 30)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--rounds", type=int, default=1, help="swapping phases, each between two quiet ones "
                        "(default 1)")
    parser.add_argument("--swap-every", type=float, default=3.0,
                        help="seconds from one swap's start to the next one's (default 3)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/swap_under_load_"
                        "<checkpoint>_<backend>_<time>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"p99 with swaps ÷ without: {result['p99_ratio']:.2f} (goal ≤ {GOAL_P99_RATIO:g}); failed requests: "
          f"{result['failed_requests']}; goal met: {result['goal']['met']}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"swap_under_load_{args.weights.name}_{args.cpu_backend}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")


if __name__ == "__main__":
    main()
