"""benchmarks/control_start.py's CPU clock, which benchmarks/faults.py also reads for the serving process."""

import os
import subprocess
import sys

from benchmarks.control_start import cpu_seconds

BURN_S = 0.5


def test_a_child_that_ended_still_counts_with_reaped_children_and_only_then():
    own, with_children = cpu_seconds(os.getpid()), cpu_seconds(os.getpid(), reaped_children=True)
    burn = ("import time\nstarted = time.process_time()\n"
            f"while time.process_time() - started < {BURN_S}:\n    pass")
    subprocess.run([sys.executable, "-c", burn], check=True)  # waited for: its seconds go to our cutime
    own_grew = cpu_seconds(os.getpid()) - own
    children_grew = cpu_seconds(os.getpid(), reaped_children=True) - with_children - own_grew
    assert children_grew >= BURN_S * 0.9
    assert own_grew < BURN_S / 2  # waiting on the child costs this process next to nothing
