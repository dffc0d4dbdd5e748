"""The server's memory under held uploads: ``python -m app`` with its default upload budget
(APP_MAX_UPLOAD_BYTES_IN_FLIGHT), and N clients that each declare a 15 MiB upload, send what the server
lets them of it, and hold the connection open. Prints the RSS before and with the uploads held, how many
were admitted and how many refused with 503 before their body, and the budget.

    .venv/bin/python -m benchmarks.held_uploads --clients 200
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.config import Settings
from benchmarks.admin_body_memory import free_port, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--upload-mib", type=int, default=15)
    args = parser.parse_args(argv)
    port = free_port()
    state = tempfile.mkdtemp(prefix="held-uploads-")
    env = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
    env |= {"APP_STATE_DIR": state, "APP_DEVICE": "cpu", "APP_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=REPO_ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    held: list[socket.socket] = []
    try:
        wait_ready(url, server, 600)
        before = rss_mib(server.pid)
        size = args.upload_mib * MIB
        head = (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        refused = 0
        for _ in range(args.clients):
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            connection.sendall(head)
            connection.setblocking(False)
            sent, payload = 0, b"\0" * MIB
            try:
                while sent < size - MIB:  # all but the last MiB, then hold
                    sent += connection.send(payload)
            except BlockingIOError:
                pass
            connection.setblocking(True)
            connection.settimeout(0.2)
            try:
                if connection.recv(12).startswith(b"HTTP/1.1 503"):
                    refused += 1
                    connection.close()
                    continue
            except TimeoutError:
                pass
            held.append(connection)
        time.sleep(2)  # let the server read what the admitted ones sent
        during = rss_mib(server.pid)
        metrics = httpx.get(f"{url}/metrics").text
        in_flight = re.search(r"^http_upload_bytes_in_flight (\S+)$", metrics, re.MULTILINE).group(1)  # type: ignore[union-attr]
        budget = Settings().max_upload_bytes_in_flight / MIB
        print(f"clients {args.clients} x {args.upload_mib} MiB: admitted {len(held)}, refused with 503 {refused}; "
              f"reserved {float(in_flight) / MIB:.0f} MiB of a {budget:.0f} MiB budget; RSS {before:.0f} MiB "
              f"before, {during:.0f} MiB held (+{during - before:.0f} MiB)")
    finally:
        for connection in held:
            connection.close()
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
