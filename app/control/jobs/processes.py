"""Starting, identifying and stopping a training process group.

Training starts in a new session (``start_new_session=True``), so its process group id equals its PID and one
signal reaches the whole group, torchrun's workers included. A PID alone does not identify a process after a
restart (PIDs are reused), so the job store also keeps the process's start time from ``/proc/<pid>/stat``;
a recorded process is only signalled if both still match.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of ``/proc/<pid>/stat``), or None if the
    process is gone, a zombie, or this is not Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def is_alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started``. Without a recorded start time the
    answer is no: a PID alone may name any process by now (issue 22), and signalling a stranger is worse than
    leaving an orphan, which its own run directory and the host's process list still show."""
    if started is None:
        return False
    if Path("/proc/self/stat").exists():
        return start_time(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Secrets of the service that a training process has no use for: the admin token, and the job database's
# URL, which carries its password (training writes files; only the runner writes job records).
WITHHELD_VARIABLES = frozenset({"APP_ADMIN_TOKEN", "APP_DATABASE_URL"})


def launch(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log_path``, unbuffered so the log
    follows the run, and without the service's secrets in its environment."""
    env = {name: value for name, value in os.environ.items() if name not in WITHHELD_VARIABLES}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env | {"PYTHONUNBUFFERED": "1"},
        )


def signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pid: int, started: int | None, timeout_s: float,
               child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the group led by ``pid`` (training exits promptly on it), then SIGKILL whatever is left after
    ``timeout_s``. Blocking: call it from a worker thread in async code. Pass ``child`` when this process
    started the leader, so it is reaped rather than left a zombie.

    The leader's identity is checked first, so a reused PID is never signalled. Once the leader is gone its
    group id cannot be reused while members remain, so the final SIGKILL reaches only stragglers.
    """

    def leader_alive() -> bool:
        return child.poll() is None if child is not None else is_alive(pid, started)

    if not leader_alive():
        return
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while leader_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_group(pid, signal.SIGKILL)
    while leader_alive():
        time.sleep(0.05)
