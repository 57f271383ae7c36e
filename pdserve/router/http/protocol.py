"""Client-facing side of the HTTP/1.1 layer: `HttpListener` and one asyncio Protocol per connection (uvloop).

Lifecycle of a connection:
  1. bytes arrive → the head is parsed (bounded size; strict framing); `Expect: 100-continue`
     is answered; a body over `max_body` (declared, or a chunked one once it grows past it)
     gets its 413 at once, then the rest of the body is read and dropped before the connection
     closes (a lingering close, bounded by `MAX_DISCARD` bytes and the idle timeout): a client
     that writes its whole body before reading (Python's urllib) sees the 413, not a reset;
     with `Expect: 100-continue` the body never comes, so the connection closes at once;
  2. a complete request starts one handler task (requests on a connection run one at a time,
     pipelined ones wait in the buffer, which is bounded by pausing reads);
  3. the handler returns a `Response` (sent with Content-Length) or streams through
     `request.writer` (chunked encoding, with write back-pressure);
  4. keep-alive: the next request is parsed; idle or slow connections are closed after
     `idle_timeout`; a client that disconnects cancels its handler task at once, which is how
     an abandoned request is cancelled all the way to the workers.
`HttpListener.close()` stops accepting, closes idle connections and waits (bounded) for busy ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.router.http.parser import (CHUNKED, FIXED, LAST_CHUNK, ChunkedDecoder, ParseError, body_framing,
                                        encode_chunk, parse_head, parse_headers, parse_request_line, status_line)

logger = logging.getLogger("pdserve.router.http")

ErrorBody = Callable[[int, str], bytes]
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_DISCARD = 1 << 30  # bytes of a refused body read (and dropped) before the connection closes


class ClientGone(ConnectionError):
    """The client closed the connection while its response was being written."""


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str | None = "application/json",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []


class StreamWriter:
    """Streams one chunked response; `started` is True once the first byte left for the client."""

    __slots__ = ("_conn", "finished", "started", "status")

    def __init__(self, conn: HttpProtocol) -> None:
        self._conn = conn
        self.started = False
        self.finished = False
        self.status = 0

    async def start(self, status: int, headers: list[tuple[str, str]], content_type: str | None) -> None:
        self.started = True
        self.status = status
        extra = [("content-type", content_type)] if content_type else []
        self._conn.write_head(status, extra + headers + [("transfer-encoding", "chunked")])

    async def write(self, data: bytes) -> None:
        if data:
            await self._conn.write_body(encode_chunk(data))

    async def finish(self) -> None:
        if not self.finished:
            self.finished = True
            await self._conn.write_body(LAST_CHUNK)


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "target", "writer")

    def __init__(self, method: str, target: str, headers: dict[str, str], keep_alive: bool,
                 writer: StreamWriter) -> None:
        self.method = method
        self.target = target
        path, _, self.query = target.partition("?")
        self.path = path
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.writer = writer


Handler = Callable[[Request], Awaitable["Response | None"]]


class HttpListener:
    """Owns the protocol settings and the live connections of one listening socket."""

    def __init__(self, handler: Handler, error_body: ErrorBody, *, max_body: int, max_head: int = 64 * 1024,
                 idle_timeout: float = 60.0) -> None:
        self.handler = handler
        self.error_body = error_body
        self.max_body = max_body
        self.max_head = max_head
        self.idle_timeout = idle_timeout
        self.connections: set[HttpProtocol] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None

    def protocol_factory(self) -> HttpProtocol:
        return HttpProtocol(self)

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol_factory, sock=sock, backlog=2048)

    async def close(self, timeout: float) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.task is not None for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()


class HttpProtocol(asyncio.Protocol):
    def __init__(self, listener: HttpListener) -> None:
        self.s = listener
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.req: Request | None = None  # being read (head parsed, body incomplete)
        self._need = 0
        self._chunks: ChunkedDecoder | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._paused_reading = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed = False
        self._discard: int | None = None  # lingering after a 413: body bytes still allowed in
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # -- connection events ------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.s.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.s.connections.discard(self)
        self._cancel_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ClientGone("client disconnected"))

    def eof_received(self) -> bool:
        return False  # a half-close is a disconnect: close, and cancel what runs

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def data_received(self, data: bytes) -> None:
        if self._discard is not None:
            self._drop(data)
            return
        self.buf += data
        if self.task is None:
            self._parse()
        elif len(self.buf) > self.s.max_head and not self._paused_reading:
            self._paused_reading = True  # pipelined bytes pile up behind a running request
            self.transport.pause_reading()  # type: ignore[union-attr]

    # -- parsing ------------------------------------------------------------------------------
    def _parse(self) -> None:
        try:
            while self.task is None and not self._closed:
                if self.req is None:
                    head = parse_head(self.buf, self.s.max_head)
                    if head is None:
                        return
                    self._start_request(head)
                    if self.req is None:  # answered already (413 ...)
                        return
                if not self._read_body():
                    return
                req, self.req = self.req, None
                req.body = b"".join(self._parts) if len(self._parts) != 1 else self._parts[0]
                self._parts = []
                self._cancel_timer()
                self.task = self._loop.create_task(self._run(req))
        except ParseError as exc:
            if exc.status == 413 and self.req is not None and self._chunks is not None:
                self._refuse_body(str(exc))  # a chunked body past the cap: drop the rest of it
            else:
                self._fail(exc.status, str(exc))

    def _start_request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        method, target, version = parse_request_line(lines[0])
        headers = parse_headers(lines[1:])
        kind, length = body_framing(headers, is_response=False)
        conn_hdr = headers.get("connection", "").lower()
        keep_alive = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
        if self.s.closing:
            keep_alive = False
        if kind == FIXED and length > self.s.max_body:
            message = f"request body is larger than the limit of {self.s.max_body} bytes"
            if headers.get("expect", "").lower() == "100-continue" or length > MAX_DISCARD:
                self._fail(413, message)
            else:
                self._need, self._chunks = length, None
                self._refuse_body(message)
            return
        self.req = Request(method, target, headers, keep_alive, StreamWriter(self))
        self._need = length if kind == FIXED else 0
        self._chunks = ChunkedDecoder() if kind == CHUNKED else None
        self._size = 0
        if kind != 0 and headers.get("expect", "").lower() == "100-continue":
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def _read_body(self) -> bool:
        """Move body bytes from the buffer; True when the body is complete."""
        if self._chunks is not None:
            for piece in self._chunks.feed(self.buf):
                self._size += len(piece)
                if self._size > self.s.max_body:
                    raise ParseError(f"request body is larger than the limit of {self.s.max_body} bytes", 413)
                self._parts.append(piece)
            return self._chunks.done
        if self._need:
            take = min(self._need, len(self.buf))
            if take:
                self._parts.append(bytes(self.buf[:take]))
                del self.buf[:take]
                self._need -= take
            return self._need == 0
        return True

    def _refuse_body(self, message: str) -> None:
        """413 now; the body's remaining bytes (`_need`, or the chunked decoder's) are dropped as
        they come, then the connection closes (see the module docstring)."""
        self.req, self._parts = None, []
        self._discard = MAX_DISCARD
        self._fail(413, message, close=False)
        data, self.buf = bytes(self.buf), bytearray()
        self._drop(data)

    def _drop(self, data: bytes) -> None:
        """Lingering after a 413: count `data` off the refused body; close once it is all in."""
        assert self._discard is not None
        self._discard -= len(data)
        if self._chunks is not None:
            self.buf += data
            try:
                self._chunks.feed(self.buf)
            except ParseError:
                self._discard = -1
            done = self._chunks.done
        else:
            self._need -= len(data)
            done = self._need <= 0
        if done or self._discard < 0:
            self.close()
        else:
            self._arm_timer()  # a client that stops sending: closed when idle

    def _fail(self, status: int, message: str, close: bool = True) -> None:
        """Answer a protocol-level error and close the connection."""
        if self.transport is None or self._closed:
            return
        body = self.s.error_body(status, message)
        self.write_head(status, [("content-type", "application/json"), ("content-length", str(len(body))),
                                 ("connection", "close")])
        self.transport.write(body)
        if close:
            self.close()

    # -- running a request ----------------------------------------------------------------------
    async def _run(self, req: Request) -> None:
        keep = req.keep_alive
        try:
            resp = await self.s.handler(req)
            if self._closed:
                return
            if resp is not None and not req.writer.started:
                keep = keep and not self.s.closing
                self._send(resp, keep)
            elif resp is None and not req.writer.started:
                keep = False
                self._send(Response(self.s.error_body(500, "the handler sent no response"), 500), False)
            elif req.writer.started and not req.writer.finished:
                keep = False  # the handler gave up mid-stream: the client must see a cut
            if req.writer.started and self._write_paused and not self._closed:
                await self._wait_drain()
        except asyncio.CancelledError:
            keep = False
            if not self._closed:  # cancelled by shutdown rather than by the client
                self.abort()
            raise
        except ClientGone:
            keep = False
        except Exception:
            logger.exception("unhandled error in request handler for %s %s", req.method, req.path)
            keep = False
            if not req.writer.started and not self._closed:
                self._send(Response(self.s.error_body(500, "internal router error"), 500), False)
        finally:
            self.task = None
        if self._closed:
            return
        if not keep:
            self.close()
            return
        self._arm_timer()
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.buf:
            self._parse()

    def _send(self, resp: Response, keep: bool) -> None:
        headers = list(resp.headers)
        if resp.content_type:
            headers.append(("content-type", resp.content_type))
        headers.append(("content-length", str(len(resp.body))))
        if not keep:
            headers.append(("connection", "close"))
        self.transport.write(  # type: ignore[union-attr]
            status_line(resp.status) + "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1")
            + b"\r\n" + resp.body)

    # -- writing --------------------------------------------------------------------------------
    def write_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self._closed:
            raise ClientGone("client disconnected")
        self.transport.write(  # type: ignore[union-attr]
            status_line(status) + "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1") + b"\r\n")

    async def write_body(self, data: bytes) -> None:
        if self._closed:
            raise ClientGone("client disconnected")
        self.transport.write(data)  # type: ignore[union-attr]
        if self._write_paused:
            await self._wait_drain()

    async def _wait_drain(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()
        await self._drain

    # -- timers and closing -----------------------------------------------------------------------
    def _arm_timer(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self.s.idle_timeout, self._on_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_idle(self) -> None:
        self._timer = None
        if self._discard is not None:
            self.close()
        elif self.task is None:
            if self.req is not None or self.buf:
                self._fail(408, "request not received in time")
            else:
                self.close()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()
