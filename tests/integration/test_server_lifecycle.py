"""Process-level behaviour of `pdserve serve`: the API key (from $PDSERVE_API_KEY) guards every
route but /health and /metrics; start-up failures exit non-zero without leftovers; SIGTERM
aborts in-flight streams, stops the engine process and leaves no orphan processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ROOT, ServerProcess, children_of, free_port, pid_alive, serve_command

KEY = "test-key-123"
PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("POST", "/generate"), ("GET", "/get_load"), ("GET", "/server_info"), ("GET", "/get_server_info"),
             ("GET", "/model_info"), ("GET", "/get_model_info"), ("POST", "/flush_cache"),
             ("POST", "/abort_request"), ("GET", "/health_generate"), ("GET", "/kv_events/snapshot")]


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--max-model-len", "512", "--num-pages", "200"],
                           tmp_path_factory.mktemp("key-server") / "server.log",
                           env={"PDSERVE_API_KEY": KEY}, api_key=KEY)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("method,path", PROTECTED, ids=[p for _, p in PROTECTED])
def test_api_key_required(key_server: ServerProcess, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": "nope"}):
        r = httpx.request(method, f"{key_server.url}{path}", headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (path, headers, r.status_code)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"


def test_open_routes_and_valid_key(key_server: ServerProcess) -> None:
    url = key_server.url
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{url}/get_load", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    assert httpx.get(f"{url}/get_load", headers={"X-API-Key": KEY}, timeout=10).status_code == 200
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    resp = good.completions.create(model="default", prompt="Hi", max_tokens=2, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_sigterm_aborts_streams_and_leaves_no_orphans(key_server: ServerProcess) -> None:
    url, headers = key_server.url, key_server.headers
    engine_pid = httpx.get(f"{url}/server_info", headers=headers, timeout=10).json()["engine_pid"]
    descendants = children_of(key_server.proc.pid)
    assert engine_pid in descendants
    events: list[Any] = []
    first = threading.Event()

    def stream() -> None:
        body = {"text": "Count:", "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}
        try:
            with httpx.stream("POST", f"{url}/generate", json=body, headers=headers, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        except httpx.HTTPError as exc:  # a dropped connection is acceptable too
            events.append(f"error: {exc}")
        first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(120), "no streamed output"
    key_server.proc.send_signal(signal.SIGTERM)
    code = key_server.proc.wait(60)
    t.join(30)
    assert not t.is_alive()
    assert code == 0, key_server.log_tail()
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(pid_alive(p) for p in descendants):
        time.sleep(0.2)
    assert not [p for p in descendants if pid_alive(p)], "orphan processes left behind"
    assert not pid_alive(engine_pid)


def _run_failing(args: list[str], tmp_path: Path, timeout: float = 180) -> tuple[int, str, float]:
    log = tmp_path / "fail.log"
    start = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(serve_command() + args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return code, log.read_text(errors="replace"), time.monotonic() - start


def test_port_in_use_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        code, log, took = _run_failing(["--port", str(port)], tmp_path, timeout=60)
    assert code != 0 and "cannot bind" in log
    assert took < 30


def test_bad_model_exits_cleanly(tmp_path: Path) -> None:
    code, log, _ = _run_failing(["--port", str(free_port()), "--model", str(tmp_path / "no-such-model")], tmp_path)
    assert code != 0
    assert "no-such-model" in log
