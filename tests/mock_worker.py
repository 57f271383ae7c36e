"""A tiny stand-in for a pdserve worker (unified, prefill or decode), for fast router tests.

It speaks the worker API the router uses — `/generate`, `/v1/completions`,
`/v1/chat/completions` (whole or SSE-streamed), `/health`, `/get_load`, `/server_info`,
`/model_info`, `/v1/models`, `/health_generate`, `/flush_cache`, `/abort_request` — with
deterministic text ("tok0 tok1 ..."), and can misbehave on demand: answer N requests (or all)
with a status, add latency, stream slowly, hang a decode "waiting for KV", answer a PD leg only
after its peer received the other leg, fail health checks, or die (stop listening and drop
every connection). It records what it received (bodies, headers) and how each request ended
(completed / cancelled by the client).

In-process: `MockWorker(role="decode").start()` runs it on its own event loop in a thread;
`configure(...)`, `kill()`, `revive()`, `stop()`; `records`, `counts`. As a process
(benchmarks): `python -m tests.mock_worker --port P [--role R] [--latency-ms X]`; `--fast`
swaps in a minimal asyncio responder that answers every POST with one canned completion (no
framework overhead, for measuring routers) and GETs with small JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

MODES = {"unified": "null", "prefill": "prefill", "decode": "decode"}


def wait_until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `pred()` every 50 ms until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(pred: Any, timeout: float = 10.0) -> None:
    """`wait_until` on an event loop: poll `pred()` every 5 ms; go on after `timeout` regardless
    (the test's own assertions then say what did not happen)."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


@dataclass(frozen=True)
class Behaviour:
    latency_s: float = 0.0  # before answering a generation request
    fail_status: int | None = None  # answer generation requests with this status...
    fail_count: int = -1  # ...this many times (-1: always)
    token_delay_s: float = 0.0  # between streamed tokens
    decode_wait_s: float = 0.0  # decode: "waiting for the KV transfer" before the first token
    health_status: int = 200
    extra_load: int = 0  # added to /get_load
    max_tokens: int = 4
    # a MockWorker: answer only once it received this request's other PD leg (the same
    # bootstrap_room), so a test fixes which leg answers first instead of racing them (bounded)
    after_peer: MockWorker | None = None


@dataclass
class Record:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    outcome: str = "running"  # running | completed | cancelled | failed
    t: float = field(default_factory=time.monotonic)


class MockWorker:
    def __init__(self, role: str = "unified", port: int | None = None, bootstrap_port: int | None = None,
                 **behaviour: Any) -> None:
        assert role in MODES
        self.role = role
        self.port = port or free_port()
        self.bootstrap_port = bootstrap_port
        self.behaviour = Behaviour(**behaviour)
        self.records: list[Record] = []
        self.in_flight = 0
        self.health_checks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (from the test thread) ---------------------------------------------------
    def configure(self, **changes: Any) -> None:
        self.behaviour = replace(self.behaviour, **changes)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"received": len(self.records)}
        for r in self.records:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    def generation_records(self) -> list[Record]:
        return [r for r in self.records if r.path in ("/generate", "/v1/completions", "/v1/chat/completions")]

    def has_room(self, room: Any) -> bool:
        """Did a generation request with this bootstrap_room (a PD leg) arrive here?"""
        return any(r.body.get("bootstrap_room") == room for r in self.generation_records())

    def start(self, timeout: float = 10.0) -> MockWorker:
        self._started.clear()
        self._thread = threading.Thread(target=self._main, name=f"mock-{self.role}-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("mock worker did not start")
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._serve())
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._cleanup())
        loop.close()

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            server = self._runner.server
            for conn in list(getattr(server, "connections", []) if server else []):
                if conn.transport is not None:
                    conn.transport.abort()
            await self._runner.cleanup()
            self._runner = None

    def kill(self) -> None:
        """Die: stop listening and drop every open connection at once."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def revive(self) -> MockWorker:
        return self.start()

    stop = kill

    # -- the app --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self.generation)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/get_load", self.get_load)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/flush_cache", self.ok)
        app.router.add_post("/abort_request", self.ok)
        return app

    async def health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(status=self.behaviour.health_status)

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    async def get_load(self, request: web.Request) -> web.Response:
        n = self.in_flight + self.behaviour.extra_load
        return web.json_response({"num_reqs": n, "num_running_reqs": n, "num_waiting_reqs": 0, "kv_usage": 0.0})

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "mock", "disaggregation_mode": MODES[self.role],
                                  "disaggregation_bootstrap_port": self.bootstrap_port, "max_model_len": 2048})

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "mock", "is_generation": True})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "mock"}]})

    async def generation(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        rec = Record(request.path, body, {k.lower(): v for k, v in request.headers.items()})
        self.records.append(rec)
        b = self.behaviour
        self.in_flight += 1
        try:
            room = body.get("bootstrap_room")
            if b.after_peer is not None and room is not None:
                await _until(lambda: b.after_peer.has_room(room))
            if b.latency_s:
                await asyncio.sleep(b.latency_s)
            if b.fail_status is not None and b.fail_count != 0:
                if b.fail_count > 0:
                    self.configure(fail_count=b.fail_count - 1)
                rec.outcome = "failed"
                return web.json_response({"error": {"message": f"mock failure {b.fail_status}", "type": "mock",
                                                    "param": None, "code": b.fail_status}}, status=b.fail_status)
            if self.role == "decode" and b.decode_wait_s:
                await asyncio.sleep(b.decode_wait_s)
            n = 1 if self.role == "prefill" else int(body.get("max_tokens") or body.get("max_completion_tokens")
                                                         or (body.get("sampling_params") or {}).get("max_new_tokens")
                                                         or b.max_tokens)
            if body.get("stream"):
                resp = await self._stream(request, body, n)
            else:
                resp = web.json_response(self._answer(request.path, body, n, n))
            rec.outcome = "completed"
            return resp
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        finally:
            self.in_flight -= 1

    def _meta(self, body: dict[str, Any], done: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"id": "mock", "prompt_tokens": 3, "completion_tokens": done,
                                "finish_reason": {"type": "length"}, "bootstrap_room": body.get("bootstrap_room"),
                                "worker": self.url, "role": self.role}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = ([[-0.5, i, None] for i in range(3)] if self.role == "prefill"
                                            else [])
            meta["output_token_logprobs"] = [[-0.1, i, None] for i in range(done)]
        return meta

    def _answer(self, path: str, body: dict[str, Any], n: int, done: int) -> dict[str, Any]:
        text = " ".join(f"tok{i}" for i in range(done))
        info = {"worker": self.url, "role": self.role, "room": body.get("bootstrap_room")}
        if path == "/generate":
            return {"text": text, "output_ids": list(range(done)), "meta_info": self._meta(body, done)}
        usage = {"prompt_tokens": 3, "completion_tokens": done, "total_tokens": 3 + done}
        if path == "/v1/chat/completions":
            return {"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}], "usage": usage, "mock_worker": info}
        return {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                "usage": usage, "mock_worker": info}

    async def _stream(self, request: web.Request, body: dict[str, Any], n: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        path = request.path
        for i in range(n):
            if i and self.behaviour.token_delay_s:
                await asyncio.sleep(self.behaviour.token_delay_s)
            if path == "/generate":
                chunk: dict[str, Any] = {"text": " ".join(f"tok{j}" for j in range(i + 1)),
                                         "meta_info": self._meta(body, i + 1), "index": 0}
            elif path == "/v1/chat/completions":
                delta = {"role": "assistant", "content": f"tok{i}"} if i == 0 else {"content": f" tok{i}"}
                chunk = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
                         "choices": [{"index": 0, "delta": delta,
                                      "finish_reason": "length" if i == n - 1 else None}]}
            else:
                chunk = {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "mock",
                         "choices": [{"index": 0, "text": f"tok{i}" if i == 0 else f" tok{i}",
                                      "finish_reason": "length" if i == n - 1 else None, "logprobs": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# -- a framework-free responder for router benchmarks -------------------------------------------
_CANNED = json.dumps({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "mock",
                      "choices": [{"index": 0, "text": "tok0 tok1 tok2 tok3", "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()


class _FastProtocol(asyncio.Protocol):
    latency_s = 0.0
    info = b"{}"

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            if head.startswith(b"post"):
                body = _CANNED
            elif head.startswith(b"get /health"):
                body = b""
            else:
                body = self.info
            if head.startswith(b"post") and self.latency_s:
                asyncio.get_running_loop().call_later(self.latency_s, self._send, body)
            else:
                self._send(body)

    def _send(self, body: bytes) -> None:
        if not self.t.is_closing():
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))


def main() -> None:
    p = argparse.ArgumentParser(description="mock pdserve worker")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--role", choices=list(MODES), default="unified")
    p.add_argument("--bootstrap-port", type=int, default=None)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--fast", action="store_true", help="framework-free canned responder (benchmarks)")
    args = p.parse_args()
    if args.fast:
        import uvloop

        _FastProtocol.latency_s = args.latency_ms / 1000
        _FastProtocol.info = json.dumps({"model_path": "mock", "disaggregation_mode": MODES[args.role],
                                         "disaggregation_bootstrap_port": args.bootstrap_port,
                                         "object": "list", "data": [{"id": "mock"}]}).encode()

        async def run() -> None:
            server = await asyncio.get_running_loop().create_server(_FastProtocol, "127.0.0.1", args.port,
                                                                    reuse_address=True, backlog=2048)
            async with server:
                await server.serve_forever()

        uvloop.run(run())
        return
    MockWorker(args.role, args.port, args.bootstrap_port, latency_s=args.latency_ms / 1000).start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
