"""What one start of the control plane costs: ``python -m app.control`` from its spawn until ``/readyz`` answers 200.

    .venv/bin/python -m benchmarks.control_start --label after                       # this checkout
    .venv/bin/python -m benchmarks.control_start --label before --source /tmp/base   # another checkout

Its supervisor (``app/control/supervisor.py``) restarts the control plane whenever it dies, on the machine that
serves ``/predict``; on 2 cores each restart's CPU is taken from the serving threads (benchmarks/README.md, "The
data plane under faults": p99 1.7-2.6x during a restart). Each repeat starts ``python -m app.control`` from
``--source`` with a fresh temporary state folder (the embedded SQLite job store, the runner elected, the shipped
checkpoint as the start-up model), polls ``/readyz`` every 20 ms, and at its first 200 reads from /proc: the
child's CPU seconds (``utime + stime``), its resident memory, and whether a file of torch is mapped into it.
Prints a table and writes ``benchmarks/results/control_start-<label>.json`` with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cpu_backends import describe_machine
from tests.support.net import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
TOKEN = "benchmark-admin-token-0123456789"
POLL_S = 0.02
TIMEOUT_S = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """``utime + stime`` of ``pid`` (its own threads), from /proc/<pid>/stat; with ``reaped_children``, plus
    ``cutime + cstime``: the children it has waited for, whose seconds would otherwise vanish as they end."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    seconds = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    if reaped_children:
        seconds += int(fields[13]) + int(fields[14])  # fields 16 and 17
    return seconds / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def torch_mapped(pid: int) -> bool:
    """Whether torch was imported: its extension or its libraries (libtorch, libc10) are mapped."""
    return any("/torch/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def start_once(source: Path) -> dict[str, Any]:
    """One start of ``python -m app.control`` from ``source``, measured at its first ``/readyz`` 200."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="control-start-") as state:
        env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
        env |= {"APP_STATE_DIR": state, "APP_ADMIN_TOKEN": TOKEN, "APP_DATA_DIR": str(Path(state) / "data"),
                "PYTHONPATH": str(source)}
        log = Path(state) / "control.log"
        with open(log, "wb") as sink:
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "app.control", "--port", str(port)], cwd=source,
                                       env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(timeout=5) as http:
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"the control plane exited with {process.returncode}: "
                                           f"{log.read_text(errors='replace')[-2000:]}")
                    if time.perf_counter() - started > TIMEOUT_S:
                        raise RuntimeError(f"/readyz did not answer 200 within {TIMEOUT_S} s")
                    try:
                        if http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(POLL_S)
            wall = time.perf_counter() - started
            return {"wall_s": round(wall, 3), "cpu_s": round(cpu_seconds(process.pid), 3),
                    "rss_mib": round(rss_mib(process.pid), 1), "torch_imported": torch_mapped(process.pid)}
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def commit(source: Path) -> str:
    described = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"], capture_output=True,
                               text=True, check=False)
    return described.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names the result: control_start-<label>.json")
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="the checkout to start (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    source = args.source.resolve()
    load_before = os.getloadavg()
    runs = [start_once(source) for _ in range(args.repeats)]
    result = {
        "what": "python -m app.control from spawn to its first /readyz 200: wall s, the child's CPU s (utime + "
                "stime), its RSS, whether torch is mapped",
        "label": args.label,
        "source": str(source),
        "commit": commit(source),
        "runs": runs,
        "median": {key: statistics.median(run[key] for run in runs) for key in ("wall_s", "cpu_s", "rss_mib")},
        "torch_imported": any(run["torch_imported"] for run in runs),
        "load_average_before": [round(value, 2) for value in load_before],
        "machine": describe_machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"{args.label} ({result['commit']}, {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"load {load_before[0]:.2f})")
    print("| run | wall s | CPU s | RSS MiB | torch imported |")
    print("|---|---:|---:|---:|---|")
    for number, run in enumerate(runs, 1):
        print(f"| {number} | {run['wall_s']:.2f} | {run['cpu_s']:.2f} | {run['rss_mib']:.1f} | "
              f"{run['torch_imported']} |")
    median = result["median"]
    print(f"| median | {median['wall_s']:.2f} | {median['cpu_s']:.2f} | {median['rss_mib']:.1f} | "
          f"{result['torch_imported']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"control_start-{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
