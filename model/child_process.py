"""Child processes that end with their parent, however the parent ends.

A worker the parent spawned for a long computation (the ONNX export, the service's backend verification)
is useless once the parent is gone, and an orphan keeps the cores busy for nobody: the verification child,
SIGTERMed when the service stopped, left its ONNX-export worker running. Linux's PR_SET_PDEATHSIG sends the
child a signal when its parent dies; elsewhere this does nothing and the child ends when it next talks to
its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent(signal_number: int = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """Have this process sent ``signal_number`` when its parent dies. Given ``parent_pid`` (the parent's pid
    as the parent saw it), a parent that died before this call is caught too: the child was re-parented
    already, so the signal would never come, and it ends at once instead."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal_number)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal_number)
