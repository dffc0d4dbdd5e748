"""Loopback helpers for the tests that start servers: a free port, and waiting for one to answer."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx

from tests.support.waiting import wait_until


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Until ``GET url`` answers 200; fails, showing the end of the process's log, when the process exits
    or ``timeout_s`` passes first."""
    def answers() -> bool:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout_s, f"{url} to answer 200", every_s=0.1)
    except AssertionError as error:
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else "(no log)"
        raise AssertionError(f"{error}; its log ends:\n{tail}") from None
