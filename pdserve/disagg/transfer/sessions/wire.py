"""Framed messages on a TCP socket: the transfer session's byte format and its blocking I/O.

Lifecycle: `connect()` (decode) or `accept()` (prefill) gives a FrameSocket; any thread may
`send()` (a lock keeps each frame whole); one reader thread calls `recv_msg()` and, for a
DataFrame, `recv_scatter()` / `discard()` for its payload; `close()` from any thread wakes the reader, which then `dispose()`s the socket.

    frame = [u32 little-endian len(header)] [msgpack header: a SessionMsg] [payload bytes]

The socket is in blocking mode, so one `sendmsg` / `recvmsg_into(MSG_WAITALL)` moves a whole
frame inside the kernel (no Python loop, no GIL round trips per socket buffer), with kernel-side
timeouts (SO_SNDTIMEO / SO_RCVTIMEO = TICK) so a blocked reader still wakes up to check whether
it should stop, and a send that makes no progress for `stall_timeout` seconds breaks the
session (a hung peer must not pin a worker forever). TCP_NODELAY keeps the small control
frames prompt; keepalive notices a vanished host.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

import msgspec

from pdserve.disagg.messages import FRAME_PREFIX, MAX_HEADER_BYTES, SessionMsg, session_decoder, session_encoder

TICK = 0.5  # s: socket timeout; how often a blocked reader re-checks its stop conditions
IOV_BATCH = 1000  # buffers per sendmsg call (IOV_MAX is 1024 on Linux)
DISCARD_CHUNK = 1 << 20


class SessionClosed(ConnectionError):
    """The peer closed the session, the session was closed locally, or a send stalled."""


_TIMEVAL = struct.pack("ll", int(TICK), int(TICK % 1 * 1_000_000))
_WAITING = (TimeoutError, BlockingIOError, InterruptedError)  # a TICK passed without progress


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)


def listen(host: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.settimeout(TICK)
    return sock


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad transfer endpoint {endpoint!r}; expected host:port")
    return host.strip("[]"), int(port)


def join_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_host(bind_host: str) -> str:
    """The address peers should dial for a listener bound to `bind_host`."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _advance(bufs: list[memoryview], i: int, batch: list[memoryview], n: int) -> int:
    """After a syscall moved `n` bytes of `batch` (= bufs[i:...]): the index of the first buffer
    not done, with a partly moved one trimmed in place to its rest."""
    for buf in batch:
        if n < buf.nbytes:
            bufs[i] = buf[n:]
            break
        n -= buf.nbytes
        i += 1
    return i


class FrameSocket:
    def __init__(self, sock: socket.socket, stall_timeout: float = 60.0) -> None:
        _tune(sock)
        self.sock = sock
        self.stall_timeout = stall_timeout
        self._send_lock = threading.Lock()
        self._closed = False
        self._prefix = bytearray(FRAME_PREFIX.size)

    @classmethod
    def connect(cls, endpoint: str, timeout: float = 5.0, stall_timeout: float = 60.0) -> FrameSocket:
        host, port = split_endpoint(endpoint)
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock, stall_timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- sending (any thread) -----------------------------------------------------------------

    def send(self, msg: SessionMsg, payload: Iterable[memoryview] = ()) -> None:
        header = session_encoder.encode(msg)
        bufs: list[memoryview] = [memoryview(FRAME_PREFIX.pack(len(header)) + header)]
        bufs.extend(payload)
        with self._send_lock:
            if self._closed:
                raise SessionClosed("session closed")
            try:
                self._send_all(bufs)
            except (OSError, ValueError) as exc:
                self.close()
                raise SessionClosed(f"send failed: {exc}") from None

    def _send_all(self, bufs: list[memoryview]) -> None:
        i, last_progress = 0, time.monotonic()
        while i < len(bufs):
            batch = bufs[i:i + IOV_BATCH]
            try:
                sent = self.sock.sendmsg(batch)
            except _WAITING:
                if self._closed or time.monotonic() - last_progress > self.stall_timeout:
                    raise SessionClosed(f"peer stalled: no progress for {self.stall_timeout:.0f} s") from None
                continue
            if sent:
                last_progress = time.monotonic()
            i = _advance(bufs, i, batch, sent)

    # --- receiving (the one reader thread) ----------------------------------------------------

    def recv_msg(self, idle: Callable[[], None] | None = None) -> SessionMsg:
        """Next frame header. `idle()` runs on each quiet TICK and may raise to stop reading."""
        self._recv_exact(memoryview(self._prefix), idle)
        (n,) = FRAME_PREFIX.unpack(self._prefix)
        if n > MAX_HEADER_BYTES:
            raise SessionClosed(f"frame header of {n} bytes exceeds {MAX_HEADER_BYTES}")
        header = bytearray(n)
        self._recv_exact(memoryview(header), idle)
        try:
            return session_decoder.decode(header)
        except msgspec.DecodeError as exc:
            raise SessionClosed(f"malformed frame header: {exc}") from None

    def recv_scatter(self, views: list[memoryview], stop: Callable[[], bool] | None = None) -> int:
        """Fill `views` in order with as few syscalls as the data allows (recvmsg_into scatter);
        returns bytes written, short only when `stop()` turned true on a quiet TICK."""
        views = list(views)
        i = got = 0
        while i < len(views):
            if self._closed:
                raise SessionClosed("session closed")
            batch = views[i:i + IOV_BATCH]
            try:
                n = self.sock.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]
            except _WAITING:
                if stop is not None and stop():
                    return got
                continue
            except OSError as exc:
                raise SessionClosed(f"receive failed: {exc}") from None
            if n == 0:
                raise SessionClosed("peer closed the session")
            got += n
            i = _advance(views, i, batch, n)
        return got

    def discard(self, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, DISCARD_CHUNK) or 1))
        while nbytes > 0:
            n = min(nbytes, scratch.nbytes)
            self._recv_exact(scratch[:n], None)
            nbytes -= n

    def _recv_exact(self, view: memoryview, idle: Callable[[], None] | None) -> None:
        got = 0
        while got < view.nbytes:
            if self._closed:
                raise SessionClosed("session closed")
            try:
                n = self.sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            except _WAITING:
                if idle is not None and got == 0:
                    idle()
                continue
            except OSError as exc:
                raise SessionClosed(f"receive failed: {exc}") from None
            if n == 0:
                raise SessionClosed("peer closed the session")
            got += n

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Mark closed and shut the socket down (wakes blocked readers and senders). The file
        descriptor itself is released by `dispose()`, from the reader thread, so that no thread
        can ever touch a recycled descriptor."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def dispose(self) -> None:
        self.close()
        with self._send_lock:
            try:
                self.sock.close()
            except OSError:
                pass
