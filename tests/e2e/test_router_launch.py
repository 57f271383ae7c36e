"""`pdserve launch`: one command starts the router and the servers, serves, and stops everything on SIGTERM.

PD mode (one prefill + one decode) when the servers support it, else unified with one worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import ROOT, children_of, free_port, pid_alive


def _pd_supported() -> bool:
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return "--disaggregation-mode" in out.stdout


def test_launch_serves_and_stops_cleanly(tmp_path: Path, bundled_model_dir: Path) -> None:
    mode = ["--mode", "pd"] if _pd_supported() else ["--mode", "unified", "--workers", "1"]
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.launch", *mode, "--port", str(port), "--log-dir", str(tmp_path),
           "--start-timeout", "300", "--server-args", "--max-model-len 1024 --num-pages 300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("pdserve is ready"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 330
        while not ready.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.is_set(), "".join(lines)[-3000:]
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}" in text and "curl -s" in text
        children = children_of(proc.pid)
        assert len(children) >= 3  # servers (+ their engine processes) and the router
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert answer.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if pid_alive(pid)], "children left running"
        logs = sorted(p.name for p in tmp_path.iterdir())
        assert "router.log" in logs and len(logs) >= 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in children_of(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_launch_rejects_bad_counts() -> None:
    out = subprocess.run([sys.executable, "-m", "pdserve.launch", "--mode", "pd", "--prefill", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--prefill" in out.stderr


@pytest.mark.parametrize("n,cpus,expected", [(2, [0, 1], [[0], [1]]), (1, [0, 1], [[0, 1]]),
                                             (3, [0, 1], [[0], [1], [0]]), (2, [0, 1, 2, 3, 4], [[0, 1], [2, 3]])])
def test_cpu_plan(n: int, cpus: list[int], expected: list[list[int]]) -> None:
    from pdserve.launch.procs import plan_cpus

    assert plan_cpus(n, cpus) == expected
