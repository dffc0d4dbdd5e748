"""Where a loaded server's CPU goes: each thread's CPU time, and what its Python stacks were doing.

    .venv-bench/bin/python -m benchmarks.profile_serving --weights weights/fastcnn --concurrency 64
    .venv-bench/bin/python -m benchmarks.profile_serving --weights runs/r50/checkpoint --duration 20

Starts ``python -m app`` on ``--weights`` with its defaults, drives it with ``--concurrency`` closed-loop
clients (``benchmarks/load.py``: CIFAR-10 test image 0 as a PNG to ``/predict``) and, over the measured
window, reads two things about the server process:

- every thread's CPU seconds (``/proc/<pid>/task/<tid>/stat``: exact, whatever the thread runs, native code
  included), grouped by the Python name of the thread (py-spy tells which thread id has which name;
  ``inference_0`` and ``inference_1`` form the group ``inference``);
- py-spy samples of the active threads' stacks (``--rate`` Hz, ``--nonblocking`` so it never stops the
  server), each put in one stage by the frame nearest the leaf that names one: the forward pass, image
  decoding, multipart parsing, the JSON answer, logging, HTTP and ASGI, asyncio. A group's CPU is shared
  out among the stages in proportion to its samples.

So the served ÷ offline ratio of ``benchmarks/compare.py`` can be read as arithmetic: the offline figure has
every core in the forward pass, the served one only what the other stages and the load generator leave.
Needs py-spy (the ``bench`` extra) and Linux, and permission to read the server's memory (root, or
``ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.compare import git_revision, test_image, wait_until_serving
from benchmarks.cpu_backends import describe_machine
from benchmarks.load import Upload, app_service, drive, stat_cpu_seconds

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

# (stage, what a frame's text contains), tried on each frame from the leaf towards the root: the first frame
# that matches any entry decides. Order matters within a frame only.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("forward pass", ("torch/nn/modules", "model/resnet.py", "model/cifar_resnet.py", "model/fastcnn.py",
                      "model/inference.py", "torch/ao/", "torch/fx/", "onnxruntime")),
    ("image decoding", ("PIL/", "app/classification/decoding", "decode")),
    ("multipart parsing", ("multipart",)),
    ("JSON answer", ("json", "render", "pydantic")),
    ("logging", ("logging/", "app/logging")),
    ("metrics", ("prometheus_client",)),
    ("HTTP and ASGI", ("uvicorn/", "starlette/", "fastapi/", "httptools", "h11")),
    ("asyncio", ("asyncio/",)),
)
_THREAD = re.compile(r"^thread \((\d+)\): ([^;]*)")


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, markers in STAGES:
            if any(marker in frame for marker in markers):
                return stage
    return "other"


def group_of(thread_name: str) -> str:
    """``inference_1`` -> ``inference``; ThreadPoolExecutor numbers its threads so."""
    return re.sub(r"_\d+$", "", thread_name) or "unnamed"


def parse_samples(raw: str) -> tuple[dict[int, str], dict[int, Counter[str]]]:
    """py-spy's raw output (``--threads --format raw``): each thread id's name, and its samples per stage."""
    names: dict[int, str] = {}
    stages: dict[int, Counter[str]] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        found = _THREAD.match(stack)
        if not found or not count.isdigit():
            continue
        tid, name = int(found[1]), found[2]
        names[tid] = name
        stages[tid][stage_of(stack.split(";")[1:])] += int(count)
    return names, stages


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (Linux /proc)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds[int(task.name)] = stat_cpu_seconds(task / "stat")
        except OSError:
            continue  # the thread ended meanwhile
    return seconds


def breakdown(names: dict[int, str], stages: dict[int, Counter[str]], before: dict[int, float],
              after: dict[int, float], duration: float) -> list[dict]:
    """Per thread group: its threads, CPU cores used, and those cores shared out among its stages."""
    groups: dict[str, dict] = {}
    for tid, end in after.items():
        group = groups.setdefault(group_of(names.get(tid, "not seen by py-spy")),
                                  {"threads": 0, "cpu_s": 0.0, "samples": Counter()})
        group["threads"] += 1
        group["cpu_s"] += end - before.get(tid, 0.0)
        group["samples"].update(stages.get(tid, Counter()))
    rows = []
    for name, group in sorted(groups.items(), key=lambda item: -item[1]["cpu_s"]):
        cores = group["cpu_s"] / duration
        total = sum(group["samples"].values())
        rows.append({"group": name, "threads": group["threads"], "cpu_cores": round(cores, 3),
                     "samples": total,
                     "stages_cores": {stage: round(cores * count / total, 3)
                                      for stage, count in group["samples"].most_common()} if total else {}})
    return rows


async def profiled_load(url: str, upload: Upload, pid: int, args: argparse.Namespace, raw: Path) -> dict:
    await drive(url, upload, concurrency=args.concurrency, duration=args.warmup, warmup=0)
    before = thread_cpu_seconds(pid)
    spy = await asyncio.create_subprocess_exec(
        args.py_spy, "record", "--pid", str(pid), "--threads", "--nonblocking", "--format", "raw", "--rate",
        str(args.rate), "--duration", str(round(args.duration)), "--output", str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    started = time.perf_counter()
    level = await drive(url, upload, concurrency=args.concurrency, duration=args.duration, warmup=0, server_pid=pid)
    after, elapsed = thread_cpu_seconds(pid), time.perf_counter() - started
    _, spy_errors = await spy.communicate()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy_errors.decode().strip()[-500:]}")
    names, stages = parse_samples(raw.read_text())
    return {"load": level.as_dict(), "window_s": round(elapsed, 3),
            "threads": breakdown(names, stages, before, after, elapsed)}


def table(result: dict) -> str:
    lines = ["| thread group | threads | CPU cores | of which, by stage (cores) |", "|---|---:|---:|---|"]
    for row in result["threads"]:
        stages = ", ".join(f"{stage} {cores:.2f}" for stage, cores in row["stages_cores"].items() if cores >= 0.005)
        lines.append(f"| {row['group']} | {row['threads']} | {row['cpu_cores']:.2f} | {stages} |")
    load = result["load"]
    lines.append(f"| load generator (another process) | | {load['load_generator_cpu_cores']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "weights" / "fastcnn",
                        help="checkpoint directory (default weights/fastcnn)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data",
                        help="folder holding cifar-10-batches-py/, for the test image (default data)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default 64)")
    parser.add_argument("--duration", type=float, default=15.0, help="profiled seconds (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unprofiled seconds of load first")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second and thread (default 50)")
    parser.add_argument("--env", nargs="*", default=[], metavar="APP_X=VALUE", help="settings of the service")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                        help="the py-spy executable (default: on PATH, else beside this Python)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/profile_serving_"
                        "<version>_<backend>_c<concurrency>_<time>.json)")
    args = parser.parse_args(argv)
    environment = dict(setting.split("=", 1) for setting in args.env)
    workdir = Path(tempfile.mkdtemp(prefix="profile_serving_"))
    upload = Upload(test_image(args.data_dir))
    load_before = os.getloadavg()[0]
    with app_service({"APP_WEIGHTS": str(args.weights)} | environment, workdir / "service.log", REPO_ROOT
                     ) as (base, pid):
        wait_until_serving(f"{base}/predict", upload, pid)
        model = httpx.get(f"{base}/model").raise_for_status().json()
        profile = asyncio.run(profiled_load(f"{base}/predict", upload, pid, args, workdir / "py-spy.txt"))
    result = {
        "benchmark": "profile_serving", "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).relative_to(REPO_ROOT).as_posix()
                             if Path(sys.executable).is_relative_to(REPO_ROOT) else sys.executable,
                             "-m", "benchmarks.profile_serving", *(argv if argv is not None else sys.argv[1:])]),
        "machine": describe_machine(), "git": git_revision(), "weights": str(args.weights),
        "model_version": model["version"], "backend": model["backend"], "settings": environment,
        "concurrency": args.concurrency,
        "py_spy_rate_hz": args.rate, "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        **profile,
    }
    print(f"{profile['load']['requests_per_s']:.1f} req/s, p99 {profile['load']['p99_ms']:.0f} ms, "
          f"backend {result['backend']}, concurrency {args.concurrency}")
    print(table(result))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"profile_serving_{model['version']}_{model['backend']}_c{args.concurrency}_{stamp}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")


if __name__ == "__main__":
    main()
