"""Fixtures that run real `pdserve serve` processes on 127.0.0.1 (free ports, bounded waits).

`ServerProcess` starts `python -m pdserve.cli serve ...` in its own process group, waits for
/health (bounded, failing fast if the process exits), and on teardown sends SIGTERM, then
kills the whole group if anything is left. `shared_server` is one server for the whole test
session (the bundled SmolLM2 model, a 1024-token context, 1 MiB body cap); tests that use it
leave it idle with nothing running. `offline_llm` is the same engine config in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.flags.procs import kill_group

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = float(os.environ.get("PDSERVE_TEST_START_TIMEOUT", "300"))
SHARED_ARGS = ["--max-model-len", "1024", "--num-pages", "600", "--page-size", "16", "--max-body-mb", "1",
               "--max-n", "8", "--max-tokens-cap", "512", "--seed", "0"]
ENGINE_KWARGS: dict[str, Any] = {"max_model_len": 1024, "num_pages": 600, "page_size": 16, "chunk_budget": 512, "seed": 0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """All live descendants of `pid` (from /proc), excluding zombies."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def tp_ranks(server: ServerProcess) -> list[int]:
    """PIDs of a server's tensor-parallel follower processes (python -m pdserve.engine.tp_worker)."""
    out = []
    for pid in children_of(server.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdserve.engine.tp_worker" in cmd:
            out.append(pid)
    return out


def serve_command() -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", "serve"]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 api_key: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        """`host`: the address it binds and is reached at; `prefix`: a command it runs under
        (e.g. `ip netns exec NS`, a second host)."""
        self.port = port or free_port()  # a port: restart a server at the same address
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.api_key = api_key
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        cmd = [*(prefix or []), *serve_command(), "--host", host, "--port", str(self.port), *args]
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.startup_s: float | None = None  # spawn to the first healthy answer (wait_healthy)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    if self.startup_s is None:
                        self.startup_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, bounded wait, then kill the whole process group; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc)  # anything left in its group
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(SHARED_ARGS, tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def base_url(shared_server: ServerProcess) -> str:
    return shared_server.url


@pytest.fixture(scope="session")
def offline_llm(bundled_model_dir: Path) -> Any:
    """The same engine config as `shared_server`, in this process (for equality checks)."""
    from pdserve import LLM

    return LLM("default", **ENGINE_KWARGS)


def wait_idle(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /get_load until nothing runs, waits or is in flight; returns the last load."""
    deadline = time.monotonic() + timeout
    load: dict[str, Any] = {}
    while time.monotonic() < deadline:
        load = httpx.get(f"{url}/get_load", headers=headers, timeout=10).json()
        if load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0 and load["num_in_flight"] == 0 \
                and load["used_pages"] == 0:
            return load
        time.sleep(0.2)
    raise AssertionError(f"server not idle after {timeout} s: {load}")


def greedy_generate(url: str, input_ids: list[int], max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                        **extra}}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()
