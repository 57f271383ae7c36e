"""A body over the size limit gets its 413 on every client, also one that writes the whole body
before it reads the answer (Python's urllib): the server (uvicorn + BodyLimitMiddleware) and the
router (its own HTTP/1.1 layer) read and drop the rest of the body before closing, so the client
is not reset by unread bytes (issue 30)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from pdserve.router.config import LimitsConfig, RouterConfig
from pdserve.router.server import EmbeddedRouter

BODY = b'{"prompt": "' + b"x" * (64 * 1024 * 1024) + b'"}'  # 64 MiB


def post_whole(url: str, body: bytes = BODY) -> tuple[int, dict]:
    """urllib: writes the whole body, then reads the answer."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_64_mib_body_gets_413_from_the_server_via_urllib(base_url: str) -> None:
    status, body = post_whole(f"{base_url}/v1/completions")  # the shared server's cap is 1 MiB
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large"


def test_64_mib_chunked_body_gets_413_from_the_server(base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%b\r\n" % (1 << 20, b"y" * (1 << 20))
        for _ in range(64):
            s.sendall(piece)
        s.sendall(b"0\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_64_mib_body_gets_413_from_the_router_via_urllib() -> None:
    cfg = RouterConfig(port=0, limits=LimitsConfig(max_payload_bytes=1 << 20))
    with EmbeddedRouter(cfg) as router:
        for _ in range(2):  # and again: the router keeps serving
            status, body = post_whole(f"{router.url}/v1/completions")
            assert status == 413, body
            assert body["error"]["code"] == "request_too_large"
        with socket.create_connection(("127.0.0.1", router.port), timeout=60) as s:  # chunked, past the cap
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%b\r\n" % (1 << 20, b"y" * (1 << 20))
            for _ in range(8):
                s.sendall(piece)
            s.sendall(b"0\r\n\r\n")
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert urllib.request.urlopen(f"{router.url}/health", timeout=10).status == 200
