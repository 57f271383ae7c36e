"""Pooled HTTP/1.1 client from the router to its workers (asyncio Protocols on uvloop).

Lifecycle of one upstream request:
  1. `UpstreamPool.request()` takes an idle keep-alive connection to the worker (LIFO) or opens
     one (bounded by the connect timeout), writes head + body in one write, and waits for the
     response head; a *reused* connection that the worker closed before answering a single
     byte is retried once on a fresh connection (the usual keep-alive race); if that fresh
     connection is refused, the worker died after it got the request: the error is the
     disconnect, not a refused connect (a PD decode then keeps its leg and recomputes);
  2. the caller reads the body whole (`read()`) or chunk by chunk as it arrives
     (`iter_chunks()`: chunked encoding is decoded, nothing is buffered beyond what is unread,
     and reads pause while more than `MAX_BUFFERED` bytes wait);
  3. `release()` returns a fully read keep-alive connection to the pool, or closes it; closing
     an unfinished response (a cancelled request) drops the TCP connection, which is what tells
     the worker to abort the request.
Every failure is an `UpstreamError` whose `kind` says what happened (connect, disconnect,
timeout, protocol); all are worth retrying on another worker before the client saw a byte.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from pdserve.router.http.parser import (CHUNKED, FIXED, NO_BODY, UNTIL_CLOSE, ChunkedDecoder, ParseError,
                                        body_framing, parse_head, parse_headers, parse_status_line)

MAX_BUFFERED = 4 * 1024 * 1024
MAX_HEAD = 64 * 1024


class UpstreamError(ConnectionError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.idle = False
        self._reset()

    def _reset(self) -> None:
        self.head_fut: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.method = ""
        self.kind = -1
        self.need = 0
        self.decoder: ChunkedDecoder | None = None
        self.chunks: deque[bytes] = deque()
        self.queued = 0
        self.done = False
        self.got_bytes = False
        self.exc: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.reusable = True

    # -- protocol events ------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle:
            self.pool._forget(self)
            return
        if self.kind == UNTIL_CLOSE and not self.done:
            self.done = True
            self._wake()
        elif not self.done:
            self._fail(UpstreamError("disconnect", "the worker closed the connection"
                                     + (" mid-response" if self.got_bytes else "")))
        self._cancel_timer()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.head_fut is None or self.done:  # unsolicited bytes: the connection is unusable
            self.reusable = False
            if self.idle and self.transport is not None:
                self.transport.close()
            return
        self.buf += data
        try:
            if self.kind < 0 and not self._parse_head():
                return
            self._parse_body()
        except ParseError as exc:
            self.reusable = False
            self._fail(UpstreamError("protocol", str(exc)))
            if self.transport is not None:
                self.transport.abort()

    def _parse_head(self) -> bool:
        while True:
            head = parse_head(self.buf, MAX_HEAD)
            if head is None:
                return False
            lines = head.split(b"\r\n")
            version, status = parse_status_line(lines[0])
            if 100 <= status < 200 and status != 101:
                continue  # interim response (100 Continue): the real one follows
            self.status = status
            self.headers = parse_headers(lines[1:])
            self.kind, self.need = body_framing(self.headers, is_response=True, status=status, method=self.method)
            if version == "HTTP/1.0" or "close" in self.headers.get("connection", "").lower() \
                    or self.kind == UNTIL_CLOSE:
                self.reusable = False
            if self.kind == CHUNKED:
                self.decoder = ChunkedDecoder()
            if self.kind == NO_BODY:
                self.done = True
            fut = self.head_fut
            if fut is not None and not fut.done():
                fut.set_result(None)
            return True

    def _parse_body(self) -> None:
        buf = self.buf
        if self.kind == FIXED:
            take = min(self.need, len(buf))
            if take:
                self._push(bytes(buf[:take]) if take < len(buf) else bytes(buf))
                del buf[:take]
                self.need -= take
            if self.need == 0:
                self.done = True
        elif self.kind == CHUNKED:
            for piece in self.decoder.feed(buf):  # type: ignore[union-attr]
                self._push(piece)
            if self.decoder.done:  # type: ignore[union-attr]
                self.done = True
        elif self.kind == UNTIL_CLOSE and buf:
            self._push(bytes(buf))
            buf.clear()
        if self.done:
            self._cancel_timer()
            if buf:
                self.reusable = False  # bytes after the response: do not trust this connection
        self._wake()

    def _push(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.queued += len(data)
            if self.queued > MAX_BUFFERED and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.exc is None:
            self.exc = exc
        self.reusable = False
        fut = self.head_fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: the caller may be gone
        self._wake()

    def _on_timeout(self) -> None:
        self.timer = None
        if not self.done:
            self._fail(UpstreamError("timeout", "the worker did not answer in time"))
            if self.transport is not None:
                self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- used by UpstreamResponse -------------------------------------------------------------
    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.queued = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait_data(self) -> None:
        if self.chunks or self.done or self.exc is not None:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class UpstreamResponse:
    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: UpstreamConn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    async def read(self) -> bytes:
        c = self._conn
        parts: list[bytes] = []
        while True:
            await c.wait_data()
            if c.chunks:
                parts.append(c.take())
            if c.exc is not None:
                raise c.exc
            if c.done and not c.chunks:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def buffered(self) -> bool:
        """True when the body has a declared length (worth reading whole before answering)."""
        return self._conn.kind in (NO_BODY, FIXED)

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives; None at its end."""
        c = self._conn
        while True:
            if c.chunks:
                return c.take()
            if c.exc is not None:
                raise c.exc
            if c.done:
                return None
            await c.wait_data()

    async def iter_chunks(self, first: bytes | None = None) -> AsyncIterator[bytes]:
        """`first` (a piece already read with next_chunk, if any), then the rest of the body."""
        if first is not None:
            yield first
        while True:
            chunk = await self.next_chunk()
            if chunk is None:
                return
            yield chunk

    def release(self) -> None:
        """Pool the connection if the response was read whole, else drop it."""
        c = self._conn
        c._cancel_timer()
        if c.done and c.exc is None and c.reusable and not c.closed and not c.chunks:
            c.pool._put(c)
        elif c.transport is not None and not c.closed:
            c.closed = True
            c.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per worker (host, port)."""

    def __init__(self, connect_timeout: float = 10.0, max_idle_per_worker: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_worker
        self._idle: dict[tuple[str, int], list[UpstreamConn]] = {}

    async def _connect(self, key: tuple[str, int]) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        try:
            # not asyncio.wait_for: on 3.11 it swallows a cancel that races the connect's completion,
            # and the cancelled leg (e.g. a prefill whose decode failed) would then be sent anyway
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConn(self, key), key[0], key[1])
        except (OSError, asyncio.TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
            raise UpstreamError(kind, f"cannot connect to {key[0]}:{key[1]}: {exc or 'timed out'}") from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return conn  # type: ignore[return-value]

    def _get_idle(self, key: tuple[str, int]) -> UpstreamConn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.closed:
                return conn
        return None

    def _put(self, conn: UpstreamConn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle or conn.transport is None:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        conn._reset()
        conn.idle = True
        idle.append(conn)

    def _forget(self, conn: UpstreamConn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def request(self, host: str, port: int, method: str, path: str, headers: bytes, body: bytes,
                      timeout: float) -> UpstreamResponse:
        """Send one request and wait for the response head; `headers` are ready CRLF-ended lines."""
        key = (host, port)
        authority = (f"[{host}]" if ":" in host else host).encode()
        if body or method in ("POST", "PUT", "PATCH"):
            head = b"%s %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-length: %d\r\n%s\r\n" % (
                method.encode(), path.encode(), authority, port, len(body), headers)
        else:
            head = b"%s %s HTTP/1.1\r\nhost: %s:%d\r\n%s\r\n" % (method.encode(), path.encode(), authority,
                                                                 port, headers)
        data = head + body
        dropped: UpstreamError | None = None  # a reused connection closed under our request
        for attempt in (0, 1):
            conn = self._get_idle(key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect(key)
                except UpstreamError:
                    if dropped is not None:  # not the keep-alive race: the worker died with our request
                        raise dropped from None
                    raise
            loop = asyncio.get_running_loop()
            conn.head_fut = loop.create_future()
            conn.method = method
            conn.timer = loop.call_later(timeout, conn._on_timeout)
            conn.transport.write(data)  # type: ignore[union-attr]
            try:
                await conn.head_fut
            except UpstreamError as exc:
                if reused and exc.kind == "disconnect" and not conn.got_bytes:
                    dropped = exc
                    continue  # the worker closed this idle connection just as we used it
                raise
            except BaseException:
                conn._cancel_timer()
                if conn.transport is not None and not conn.closed:
                    conn.closed = True
                    conn.transport.abort()
                raise
            return UpstreamResponse(conn)
        raise UpstreamError("disconnect", "unreachable")  # pragma: no cover

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
