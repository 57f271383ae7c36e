"""A real `mooncake_master` for tests: the binary from the mooncake wheel, bound to 127.0.0.1 on
free ports, stopped by its PID (never by name). `kill` + `restart` (same port) play a master
that dies mid-run and comes back."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_binary() -> str:
    import mooncake

    return os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")


@dataclass
class MooncakeMaster:
    rpc_port: int
    metrics_port: int
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @classmethod
    def start(cls) -> "MooncakeMaster":
        m = cls(free_port(), free_port())
        m.restart()
        return m

    def restart(self, timeout_s: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [master_binary(), f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
             f"--metrics_port={self.metrics_port}", "--metrics_host=127.0.0.1", "--default_kv_lease_ttl=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.rpc_port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mooncake_master did not start on {self.address}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
