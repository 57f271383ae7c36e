"""Process-lifetime helpers shared by the processes pdserve starts (stdlib only).

`die_with_parent()` runs first thing in a child (an engine or tensor-parallel rank process) so
the kernel kills it when the process that started it dies; `kill_group(proc)` kills a child
started in its own session together with everything it started (a server's front and engine
processes), then reaps it. `pdserve launch` (launch/procs.py), the tests and the benchmarks
stop what they started with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys


def kill_group(proc: subprocess.Popen, wait_s: float = 5.0) -> None:
    """SIGKILL a child's whole process group (front and engine processes), then reap it, bounded."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so
    an engine or transfer agent never outlives the process that started it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
        except OSError:
            pass
