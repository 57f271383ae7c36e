"""Who a transfer peer is, and whether that process can still write (same-host liveness).

Lifecycle: each manager makes one `local_identity()` at start and sends it in Hello/HelloAck.
One-sided backends (shm) ask `process_gone(identity)` before freeing pages after a peer failure:
a process that no longer exists (or is a zombie, or whose pid now belongs to another process,
told apart by its start time) cannot write into shared memory any more.
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import lru_cache

from pdserve.disagg.messages import PeerIdentity


@lru_cache(maxsize=1)
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # fields from 3 (state) on


def process_start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0  # field 22 (starttime) is index 19 after "state"


def local_identity(host: str) -> PeerIdentity:
    pid = os.getpid()
    return PeerIdentity(instance=uuid.uuid4().hex, host=host or socket.gethostname(), boot_id=boot_id(),
                        pid=pid, start_time=process_start_time(pid))


def same_machine(peer: PeerIdentity) -> bool:
    return bool(peer.boot_id) and peer.boot_id == boot_id()


def process_gone(peer: PeerIdentity) -> bool:
    """True when the peer process surely no longer runs (this machine only)."""
    if not same_machine(peer):
        return False
    fields = _stat_fields(peer.pid)
    if fields is None or fields[0] in ("Z", "X"):
        return True
    return peer.start_time != 0 and int(fields[19]) != peer.start_time

