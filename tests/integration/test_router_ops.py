"""Router operations: API key on every route but health/metrics, /workers add/list/remove,
payload cap, metrics, and the HTTP front server's handling of odd or hostile clients.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve.router.config import HealthConfig, LimitsConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.mock_worker import MockWorker, free_port, wait_until

KEY = "s3cret"
HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, success_threshold=1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker() -> Iterator[MockWorker]:
    w = MockWorker().start()
    yield w
    w.kill()


@pytest.fixture
def keyed(worker: MockWorker) -> Iterator[EmbeddedRouter]:
    cfg = RouterConfig(port=0, workers=(WorkerSpec(worker.url),), policy=PolicyConfig("round_robin"), health=HEALTH,
                       api_key=KEY, limits=LimitsConfig(max_payload_bytes=4096))
    with EmbeddedRouter(cfg) as r:
        yield r


PROTECTED = [("POST", "/v1/completions", {"prompt": "x"}), ("POST", "/v1/chat/completions", {"messages": []}),
             ("POST", "/generate", {"text": "x"}), ("GET", "/v1/models", None), ("GET", "/workers", None),
             ("POST", "/workers", {"url": "http://127.0.0.1:1"}), ("DELETE", "/workers", {"url": "x"}),
             ("GET", "/get_loads", None), ("GET", "/server_info", None), ("GET", "/model_info", None),
             ("POST", "/flush_cache", None), ("GET", "/health_generate", None), ("GET", "/kv_index", None)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"X-API-Key": "nope"}], ids=["missing", "wrong", "no-scheme", "x-api-key"])
def test_wrong_or_missing_key_is_401_and_changes_nothing(keyed: EmbeddedRouter, worker: MockWorker,
                                                         headers: dict[str, str]) -> None:
    before = httpx.get(keyed.url + "/workers", headers={"Authorization": f"Bearer {KEY}"}).json()
    with httpx.Client(base_url=keyed.url, timeout=10, headers=headers) as c:
        for method, path, body in PROTECTED:
            resp = c.request(method, path, json=body)
            assert resp.status_code == 401, (method, path)
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        for path in ("/health", "/liveness", "/readiness", "/metrics"):
            assert c.get(path).status_code == 200, path
    after = httpx.get(keyed.url + "/workers", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [w["url"] for w in after["workers"]] == [w["url"] for w in before["workers"]]
    assert worker.generation_records() == []  # nothing reached the worker


def test_right_key_works_and_is_sent_to_workers(keyed: EmbeddedRouter, worker: MockWorker) -> None:
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        resp = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert resp.status_code == 200
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in worker.generation_records())


def test_workers_add_list_remove(keyed: EmbeddedRouter, worker: MockWorker) -> None:
    extra = MockWorker().start()
    try:
        with httpx.Client(base_url=keyed.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as c:
            added = c.post("/workers", json={"url": extra.url + "/"})
            assert added.status_code == 201 and added.json()["added"]["healthy"] is True
            assert c.post("/workers", json={"url": extra.url}).status_code == 409
            for bad in ({"url": 5}, {"url": "ftp://x:1"}, {"url": extra.url, "role": "prefill"}, ["x"]):
                resp = c.post("/workers", json=bad)
                assert resp.status_code == 400 and "error" in resp.json()
            assert c.post("/workers", content=b"{oops").status_code == 400
            listed = c.get("/workers").json()
            assert {w["url"] for w in listed["workers"]} == {worker.url, extra.url} and listed["total"] == 2
            seen = {c.post("/v1/completions", json={"prompt": "x"}).json()["mock_worker"]["worker"]
                    for _ in range(4)}
            assert seen == {worker.url, extra.url}
            assert c.request("DELETE", "/workers", params={"url": extra.url}).status_code == 200
            assert c.request("DELETE", "/workers", params={"url": extra.url}).status_code == 404
            assert c.request("DELETE", "/workers").status_code == 400
            assert {c.post("/v1/completions", json={"prompt": "x"}).json()["mock_worker"]["worker"]
                    for _ in range(3)} == {worker.url}
            quoted = worker.url.replace(":", "%3A").replace("/", "%2F")
            assert c.get(f"/workers/{quoted}").json()["url"] == worker.url
            assert c.delete(f"/workers/{quoted}").status_code == 200
            assert c.get("/readiness").status_code == 503
    finally:
        extra.kill()


def test_payload_cap_bad_routes_and_metrics(keyed: EmbeddedRouter, worker: MockWorker) -> None:
    with httpx.Client(base_url=keyed.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as c:
        big = c.post("/v1/completions", json={"prompt": "x" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert c.post("/v1/completions", json={"prompt": "x" * 3000}).status_code == 200
        assert c.get("/nowhere").status_code == 404 and c.get("/v1/completions").status_code == 405
        metrics = c.get("/metrics").text
        for name in ("sgl_router_requests_total", "sgl_router_running_requests",
                     "sgl_router_cb_state", "sgl_router_worker_health",
                     "sgl_router_request_duration_seconds", "sgl_router_pd_ttft_seconds"):
            assert name in metrics
        assert c.get("/get_loads").json()["workers"][0]["url"] == worker.url
    assert worker.generation_records()[-1].body["prompt"] == "x" * 3000  # the 413 never reached it


def raw(port: int, data: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_front_server_edge_cases(worker: MockWorker) -> None:
    cfg = RouterConfig(port=0, workers=(WorkerSpec(worker.url),), health=HEALTH, policy=PolicyConfig("random"))
    with EmbeddedRouter(cfg) as r:
        body = b'{"prompt": "x", "max_tokens": 1}'
        req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        two = raw(r.port, req + req.replace(b"Host: x", b"Host: x\r\nConnection: close"))
        assert two.count(b"HTTP/1.1 200 OK") == 2  # pipelined on one connection, answered in order
        chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close"
                   b"\r\nExpect: 100-continue\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        out = raw(r.port, chunked)
        assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
        for bad, status in ((b"GARBAGE\r\n\r\n", b"400"), (b"GET / HTTP/2.0\r\n\r\n", b"505"),
                            (b"POST /generate HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                             b"400"),
                            (b"GET /health HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431")):
            out = raw(r.port, bad)
            assert out.startswith(b"HTTP/1.1 " + status), out[:80]
            assert b'"error"' in out and b"connection: close" in out
        assert httpx.get(r.url + "/health").status_code == 200  # and it still serves
    assert len(worker.generation_records()) == 3


def test_cli_starts_serves_and_stops_on_sigterm(worker: MockWorker) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.router", "--port", str(port), "--worker-urls", worker.url,
           "--policy", "round_robin", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/readiness") or proc.poll() is not None, timeout=60,
                   what="the router process")
        assert proc.poll() is None
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}).status_code == 200
        taken = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and "cannot bind" in taken.stdout + taken.stderr
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sglang_admin_routes_and_cors(worker: MockWorker) -> None:
    """sglang-router's /add_worker, /list_workers, /remove_worker beside /workers; a CORS preflight
    answered for an allowed origin, refused for another, and the origin echoed on answers."""
    from pdserve.flags.cors import CorsConfig

    cors = CorsConfig(allowed_origins=("http://ui.example",), allow_credentials=True)
    cfg = RouterConfig(port=0, workers=(WorkerSpec(worker.url),), policy=PolicyConfig("round_robin"), health=HEALTH,
                       cors=cors)
    extra = MockWorker().start()
    try:
        with EmbeddedRouter(cfg) as r, httpx.Client(base_url=r.url, timeout=10) as c:
            assert c.post("/add_worker", params={"url": extra.url}).status_code in (200, 201)
            assert set(c.get("/list_workers").json()["urls"]) == {worker.url, extra.url}
            assert {w["url"] for w in c.get("/workers").json()["workers"]} == {worker.url, extra.url}
            assert c.post("/remove_worker", params={"url": extra.url}).status_code == 200
            assert c.get("/list_workers").json()["urls"] == [worker.url]
            asked = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
            pre = c.options("/v1/chat/completions", headers=asked)
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert pre.headers["access-control-allow-credentials"] == "true"
            assert c.options("/v1/chat/completions", headers={**asked, "Origin": "http://evil.example"}) \
                .status_code == 400
            answer = c.post("/v1/completions", json={"prompt": "x"}, headers={"Origin": "http://ui.example"})
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://ui.example"
    finally:
        extra.kill()
