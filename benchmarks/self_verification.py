"""What the service's self-verification costs and how long it takes, per instruction set (issue 23).

    .venv/bin/python -m benchmarks.self_verification                 # this CPU's own ISA, then the AVX2 mask
    .venv/bin/python -m benchmarks.self_verification --isa avx2 --after 15

For each ISA (``native``: no mask; ``avx2``: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), it serves a
copy of ``--weights`` *without* its ``backends-cpu.json`` (so the service must verify its backends itself, on
the shipped verification set) with a fresh state folder, and:

1. ``baseline``: the same copy with ``APP_CPU_BACKEND=fused`` (the backend that serves while verifying, with no
   verification running), ``--after`` seconds of load;
2. ``verifying``: a fresh ``auto`` service under the same load from its start until ``GET /model`` says
   ``verified`` (or ``kept_reference``) and the chosen backend serves; the time from the process's start to
   ready and to verified;
3. ``after``: ``--after`` seconds more of the same load on the winner.

The load is ``--concurrency`` clients posting `examples/cat.png`, each ``--pause`` seconds after its last
answer (``benchmarks/load.py``'s
checks: any non-200 or malformed answer is an error). Latencies are split by phase; p50/p99 per phase, and
``/model``'s figures (each backend's accuracy on the verification set, agreement, images/s at 1/16/64, the
choice). JSON goes to ``benchmarks/results/self_verification_<cpu>_<isa...>.json``; the machine is named, and
the run records that its cores were shared with other work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.compare import git_revision
from benchmarks.cpu_backends import describe_machine
from benchmarks.load import RESPONSE_FIELDS, Upload, app_service

ROOT = Path(__file__).resolve().parent.parent
MASKS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
SETTINGS = {"APP_DEVICE": "cpu"}


async def _load(url: str, upload: Upload, concurrency: int, pause: float, stop: asyncio.Event,
                samples: list[tuple[float, float, bool]]) -> None:
    """Clients that each post, wait for the answer and ``pause`` seconds, until ``stop``: (start time,
    latency, ok) per request. The pause leaves the cores idle part of the time, as a service's traffic
    mostly does; the verification, at the lowest priority, runs in that idle time."""
    body, headers = upload.encoded(f"{url}/predict")

    async def client(pool: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await pool.post(f"{url}/predict", content=body, headers=headers)
                ok = response.status_code == 200 and all(name in response.json() for name in RESPONSE_FIELDS)
            except httpx.HTTPError:
                ok = False
            samples.append((started, time.perf_counter() - started, ok))
            await asyncio.sleep(pause)

    async with httpx.AsyncClient(timeout=60) as pool:
        await asyncio.gather(*(client(pool) for _ in range(concurrency)))


def _summary(samples: list[tuple[float, float, bool]], start: float, stop: float) -> dict:
    inside = [(latency, ok) for began, latency, ok in samples if start <= began < stop]
    latencies = sorted(latency for latency, ok in inside if ok)
    result = {"seconds": round(stop - start, 1), "requests": len(latencies),
              "errors": sum(1 for _, ok in inside if not ok),
              "requests_per_s": round(len(latencies) / max(stop - start, 1e-9), 1)}
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        result |= {"p50_ms": round(cuts[49] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1)}
    return result


async def _model(client: httpx.AsyncClient, url: str) -> dict | None:
    try:
        response = await client.get(f"{url}/model")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


async def _serve_and_measure(url: str, launched: float, upload: Upload, args, *, verify: bool) -> dict:
    samples: list[tuple[float, float, bool]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as client:
        while (model := await _model(client, url)) is None:  # ready: a model answers /model
            await asyncio.sleep(0.1)
        ready = time.perf_counter()
        load = asyncio.create_task(_load(url, upload, args.concurrency, args.pause, stop, samples))
        verified = ready
        if verify:
            while True:
                model = await _model(client, url) or model
                status = model["backend_verification"]
                if status["phase"] == "kept_reference" or (
                        status["phase"] == "verified" and model["backend"] == status["chosen"]):
                    break
                if time.perf_counter() - ready > args.timeout:
                    raise SystemExit(f"not verified within {args.timeout} s: {status}")
                await asyncio.sleep(0.25)
            verified = time.perf_counter()
        await asyncio.sleep(args.after)
        stop.set()
        await load
        end = time.perf_counter()
        model = await _model(client, url) or model
    phases = {"after": _summary(samples, verified, end)}
    if verify:
        phases["verifying"] = _summary(samples, ready, verified)
    return {"ready_s": round(ready - launched, 1), "verified_s": round(verified - launched, 1) if verify else None,
            "phases": phases, "backend": model["backend"], "backend_verification": model["backend_verification"]}


def run_isa(isa: str, weights: Path, upload: Upload, args) -> dict:
    os.environ.update(MASKS[isa])  # app_service passes this process's environment on, masks included
    for name in {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"} - set(MASKS[isa]):
        os.environ.pop(name, None)
    log = Path(tempfile.mkdtemp(prefix="self_verification_")) / f"{isa}.log"
    result: dict = {"isa": isa, "mask": MASKS[isa]}
    for name, settings, verify in (("baseline", {"APP_CPU_BACKEND": "fused"}, False), ("auto", {}, True)):
        launched = time.perf_counter()
        with app_service(SETTINGS | {"APP_WEIGHTS": str(weights)} | settings, log, ROOT) as (url, _pid):
            result[name] = asyncio.run(_serve_and_measure(url, launched, upload, args, verify=verify))
        print(f"{isa} {name}: {json.dumps(result[name]['phases'])}", flush=True)
    result["log"] = str(log)
    return result


def table(results: list[dict]) -> str:
    lines = ["| ISA | backend | verification accuracy | agreement | b1 img/s | b16 img/s | b64 img/s | chosen |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        status = result["auto"]["backend_verification"]
        for row in status["backends"]:
            speeds = row["images_per_s"]
            lines.append(f"| {result['isa']} | {row['backend']} | {100 * row['accuracy']:.2f} % | "
                         f"{100 * row['agreement']:.2f} % | {speeds['1']:.0f} | {speeds['16']:.0f} | "
                         f"{speeds['64']:.0f} | {'**yes**' if row['backend'] == status['chosen'] else ''} |")
    lines += ["", "| ISA | ready s | verified s | /predict p99 fused, no verification | p99 while verifying | "
                  "p99 after, on the winner |", "|---|---:|---:|---:|---:|---:|"]
    for result in results:
        auto, baseline = result["auto"], result["baseline"]
        lines.append(f"| {result['isa']} | {auto['ready_s']} | {auto['verified_s']} | "
                     f"{baseline['phases']['after'].get('p99_ms')} ms | {auto['phases']['verifying'].get('p99_ms')} ms"
                     f" | {auto['phases']['after'].get('p99_ms')} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.self_verification",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "fastcnn")
    parser.add_argument("--isa", nargs="+", choices=sorted(MASKS), default=["native", "avx2"])
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop clients (default %(default)s)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds each client waits between its "
                                                                  "requests (default %(default)s)")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load after verification, and of "
                                                                  "the baseline (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up verifying after this many seconds")
    args = parser.parse_args(argv)
    copy = Path(tempfile.mkdtemp(prefix="unverified_")) / args.weights.name
    shutil.copytree(args.weights, copy)
    (copy / "backends-cpu.json").unlink(missing_ok=True)  # no report holds: the service must measure
    upload = Upload((ROOT / "examples" / "cat.png").read_bytes())
    machine = describe_machine()
    started_at = datetime.now(UTC)
    results = [run_isa(isa, copy, upload, args) for isa in args.isa]
    shutil.rmtree(copy.parent, ignore_errors=True)
    document = {
        "benchmark": "self_verification", "started_at": started_at.isoformat(), "git_commit": git_revision(),
        "machine": machine, "load_average_1min_at_end": os.getloadavg()[0],
        "shared_machine": "the 2 cores were shared with other work (other processes ran builds and tests "
                          "meanwhile): latencies and speeds carry that noise",
        "settings": {"concurrency": args.concurrency, "pause_s": args.pause, "after_s": args.after,
                     "weights": args.weights.name, "image": "examples/cat.png"},
        "results": results,
    }
    cpu = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")
    out = ROOT / "benchmarks" / "results" / f"self_verification_{cpu}_{'-'.join(args.isa)}.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
