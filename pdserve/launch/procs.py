"""Child processes of `pdserve launch`: CPU plan, start with pinning and a log file, health, stop.

`plan_cpus(n_servers, cpus)` splits the usable cores between model servers: each server gets
its own slice (and as many torch threads) when there are enough cores, else servers share
single cores round-robin with one thread each, so no two servers' thread pools fight over the
same core. `Child` lifecycle: `start()` spawns the command in its own session (so a Ctrl-C at
the terminal reaches only the launcher, which then stops children in order), pinned with
`sched_setaffinity` and with OMP/MKL thread counts set, stdout+stderr to its log file;
`healthy()` polls its health URL; `stop()` sends SIGTERM, waits (bounded), then kills the
whole process group (`flags.procs.kill_group`, which tests and benchmarks use too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pdserve.flags.procs import kill_group


def plan_cpus(n_servers: int, cpus: list[int]) -> list[list[int]]:
    """One CPU list per server."""
    if n_servers <= 0:
        return []
    if not cpus:
        return [[] for _ in range(n_servers)]
    if n_servers <= len(cpus):
        per = len(cpus) // n_servers
        return [cpus[i * per:(i + 1) * per] for i in range(n_servers)]
    return [[cpus[i % len(cpus)]] for i in range(n_servers)]


class Child:
    def __init__(self, name: str, cmd: list[str], log_path: Path, health_url: str | None = None,
                 cpus: list[int] | None = None, threads: int | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.health_url = health_url
        self.cpus = cpus or []
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if self.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                full_env[var] = str(self.threads)
        cpus = set(self.cpus)

        def pin() -> None:  # runs in the child between fork and exec
            if cpus and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cpus)

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, start_new_session=True, preexec_fn=pin if cpus else None)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def healthy(self, timeout: float = 2.0) -> bool:
        if self.health_url is None:
            return self.exited() is None
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout) as resp:  # noqa: S310 (local URL)
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_or_kill(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc)  # anything left in its group (engine processes)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]

