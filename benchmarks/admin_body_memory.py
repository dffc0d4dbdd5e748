"""The server's memory while an unauthenticated 200 MiB chunked body is sent to ``POST /train``.

    .venv/bin/python -m benchmarks.admin_body_memory                       # this checkout
    .venv/bin/python -m benchmarks.admin_body_memory --source /tmp/old     # another checkout, for a before/after

Starts ``python -m app`` (the shipped model, an admin token, a temporary state folder) from ``--source``, waits
until it is ready, then sends ``--mib`` MiB as a chunked body (no Content-Length, so only counting while it
streams could stop it) with no ``Authorization`` header, 1 MiB per chunk, while a thread samples the server's
resident memory (``VmRSS`` in /proc) every 20 ms. Prints and writes (``benchmarks/results/admin_body_memory.json``)
the status the server answered, when it answered (how many MiB had been sent), and its memory before and at
its peak during the send. A server that checks the token first answers 401 before reading the body and
stays flat; one that reads the body first grows by the body's size before it answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
TOKEN = "benchmark-admin-token-0123456789"
MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def send_chunked(port: int, mib: int) -> tuple[str, float, float]:
    """Send the body; return the status line, the MiB sent when the answer came, and the seconds taken."""
    chunk = b"%x\r\n" % MIB + b"\0" * MIB + b"\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
        connection.sendall(b"POST /train HTTP/1.1\r\nHost: benchmark\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        connection.setblocking(False)
        answer, answered_at = b"", None
        for sent in range(1, mib + 1):
            try:
                answer += connection.recv(65536)
            except BlockingIOError:
                pass
            if answer and answered_at is None:
                answered_at = sent - 1
            connection.setblocking(True)
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection: it will read no more
            connection.setblocking(False)
        connection.setblocking(True)
        try:
            connection.sendall(b"0\r\n\r\n")
            while b"\r\n" not in answer:
                more = connection.recv(65536)
                if not more:
                    break
                answer += more
        except (BrokenPipeError, ConnectionResetError):
            pass
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return status, float(mib if answered_at is None else answered_at), time.monotonic() - started


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="the checkout to run the server from")
    parser.add_argument("--mib", type=int, default=200, help="body size in MiB (default 200)")
    parser.add_argument("--out", type=Path, default=RESULTS / "admin_body_memory.json")
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")} | {
            "APP_ADMIN_TOKEN": TOKEN, "APP_STATE_DIR": state, "APP_DEVICE": "cpu", "APP_TORCH_THREADS": "1",
            "APP_PARALLEL_BATCHES": "1"}
        server = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=args.source, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}", server, 600)
            before = rss_mib(server.pid)
            peak, sampling = before, True

            def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, rss_mib(server.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            status, answered_after_mib, seconds = send_chunked(port, args.mib)
            time.sleep(0.5)  # let the sampler see what the last chunk cost
            sampling = False
            sampler.join()
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {
        "what": f"server RSS while an unauthenticated {args.mib} MiB chunked body is POSTed to /train",
        "source": str(args.source), "status": status, "answered_after_mib": answered_after_mib,
        "seconds": round(seconds, 2), "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
        "rss_growth_mib": round(peak - before, 1), "machine": machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"{status!r} after {answered_after_mib:g} of {args.mib} MiB sent ({seconds:.1f} s); server RSS "
          f"{before:.0f} MiB before, {peak:.0f} MiB at peak (+{peak - before:.0f} MiB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
