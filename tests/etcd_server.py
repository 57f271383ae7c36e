"""A real etcd (Debian's etcd-server, installed by scripts/install_system_deps.sh) for tests.

    with EtcdServer(tmp_path) as etcd:      # free client and peer ports on 127.0.0.1, a temp data dir
        etcd.url                            # etcd://127.0.0.1:PORT/<unique prefix>
        etcd.kill()                         # kill -9 by PID (bounded wait for the exit)
        etcd.start(wipe=True)               # again on the same ports; wipe: an empty store

Each start waits (bounded) until `/health` answers; the context's exit kills it by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import free_port

START_TIMEOUT_S = 30.0


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        pytest.fail("etcd is not installed: run scripts/install_system_deps.sh (Debian: apt-get install "
                    "etcd-server)", pytrace=False)
    return path


class EtcdServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.prefix = f"/test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}{self.prefix}"

    def start(self, wipe: bool = False) -> EtcdServer:
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        peer, client = f"http://127.0.0.1:{self.peer_port}", f"http://127.0.0.1:{self.client_port}"
        self.starts += 1
        log = open(self.tmp / f"etcd-{self.starts}.log", "wb")
        cmd = [etcd_binary(), "--name", "test", "--data-dir", str(self.data_dir), "--listen-client-urls", client,
               "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"test={peer}", "--log-level", "warn"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{client}/health", timeout=1.0).json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"etcd not healthy after {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.tmp / f"etcd-{self.starts}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()
