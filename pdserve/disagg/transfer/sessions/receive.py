"""Decode side of the two-sided control plane: one session per prefill endpoint, receivers.

Lifecycle of one room on the decode rank (state in brackets):

  1. `receiver(room, prefill_endpoint)` [Bootstrapping].
  2. `init(dst_pages, decode_prefix_len)` [WaitingForInput]: RoomInfo (the pages past the
     prompt tokens this decode holds, and how many those are) is queued to the session of that endpoint
     (opened on first use by its writer thread: connect, Hello, HelloAck); waiting_timeout starts.
  3. Payload lands: tcp DataFrames written into dst pages by the session's reader [Transferring];
     one-sided backends (shm) are written by the prefill process directly.
  4. Done(room, frames, metadata) [Success]: the metadata is kept, Ack goes back.
     Failures [Failed]: abort(), waiting_timeout, RoomFailed from prefill, the session dropping,
     the heartbeat declaring the prefill dead (`peer_dead`). Failing is two-phase: the reason is
     recorded at once and AbortRoom is sent, but poll() says Failed only when no write can land:
       - two-sided (tcp, fake): when this process is not inside a write of the room (immediate,
         or at the end of the frame chunk in hand);
       - one-sided (shm): when prefill answered RoomFailed, or its process is gone (same host).
         A failing one-sided room whose session broke re-sends AbortRoom on a fresh session.

Threads: per prefill session a writer (connect + outbox) and a reader; a housekeeper for
timeouts. The engine thread only calls receiver/init/poll/metadata/abort, which never block.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from pdserve.disagg.messages import (Ack, AbortRoom, DataFrame, Done, HeadSlice, Hello, HelloAck, MetadataRecord,
                                     PeerIdentity, RoomFailed, RoomInfo, SessionMsg)
from pdserve.disagg.transfer.backends.pages import check_pages
from pdserve.disagg.transfer.base import KVPoll, KVReceiver
from pdserve.disagg.transfer.rooms.state import RoomState
from pdserve.disagg.transfer.sessions.data_path import DataPath
from pdserve.disagg.transfer.sessions.identity import process_gone
from pdserve.disagg.transfer.sessions.wire import FrameSocket, SessionClosed


logger = logging.getLogger("pdserve.disagg.decode")

HOUSEKEEPING_S = 0.25
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
ABORT_RETRY_S = 1.0


@dataclass(eq=False)
class DecodeSession:
    endpoint: str
    outbox: queue.SimpleQueue[tuple[SessionReceiver | None, SessionMsg] | None] = field(default_factory=queue.SimpleQueue)
    sock: FrameSocket | None = None
    peer: PeerIdentity | None = None  # the prefill manager's identity, after HelloAck
    dead: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


class SessionReceiver(KVReceiver):
    """A room's handle for the engine thread; ReceiveSessions keeps its public fields (the room's record)."""

    def __init__(self, side: ReceiveSessions, room: int, endpoint: str, heads: HeadSlice | None = None,
                 fanout: int = 1) -> None:
        self.room = room
        self.endpoint = endpoint
        self.heads = heads  # the slice of the prefill rank's heads this rank takes (tp/links.py)
        self.fanout = fanout
        self._side = side
        self.state = RoomState(room, on_terminal=lambda st: side.on_terminal(st, endpoint))
        self.dst_pages: list[int] | None = None
        self.dst_set: frozenset[int] = frozenset()
        self.init_at: float | None = None
        self.record: MetadataRecord | None = None
        self.session: DecodeSession | None = None
        self.abort_at = 0.0
        self.frames = 0  # DataFrames written (reader thread only)

    @property
    def failure(self) -> str | None:
        return self.state.failure

    @property
    def peer(self) -> PeerIdentity | None:
        """The prefill manager's identity, once this room's session got its HelloAck."""
        return self.session.peer if self.session is not None else None

    def init(self, dst_pages: list[int], decode_prefix_len: int = 0) -> None:
        if self.dst_pages is not None:
            raise RuntimeError(f"room {self.room}: init() called twice")
        check_pages(list(dst_pages), self._side.mgr.num_pages, "destination")
        if decode_prefix_len < 0 or decode_prefix_len % self._side.mgr.layout.page_size:
            raise ValueError(f"decode_prefix_len {decode_prefix_len} is not a whole number of pages")
        self.dst_pages = list(dst_pages)
        self.dst_set = frozenset(self.dst_pages)
        self.init_at = time.monotonic()
        if self.state.failing:
            return
        self.state.advance(KVPoll.WaitingForInput)
        self._side.post(self, RoomInfo(room=self.room, dst_pages=self.dst_pages,
                                       decode_id=self._side.mgr.identity.instance, heads=self.heads,
                                       fanout=self.fanout, decode_prefix_len=decode_prefix_len))

    def poll(self) -> KVPoll:
        self._side.check(self)
        return self.state.poll()

    def metadata(self) -> MetadataRecord | None:
        return self.record if self.state.state == KVPoll.Success else None

    def abort(self) -> None:
        self._side.fail_receiver(self, "aborted by decode")

    def _wait_change(self, timeout: float, seen: KVPoll) -> None:
        self.state.wait_change(timeout, seen)


class ReceiveSessions:
    def __init__(self, mgr: DataPath) -> None:
        self.mgr = mgr
        self.config = mgr.config
        self._lock = threading.Lock()
        self._receivers: dict[tuple[int, str], SessionReceiver] = {}  # (room, prefill endpoint)
        self._sessions: dict[str, DecodeSession] = {}
        self._closing = threading.Event()
        self._hk = threading.Thread(target=self._housekeeping, name="pd-decode-hk", daemon=True)
        self._hk.start()

    # --- engine-facing ------------------------------------------------------------------------

    def receiver(self, room: int, endpoint: str, heads: HeadSlice | None = None, fanout: int = 1) -> SessionReceiver:
        with self._lock:
            if (room, endpoint) in self._receivers:
                raise ValueError(f"room {room} already has a live receiver")
            r = SessionReceiver(self, room, endpoint, heads, fanout)
            self._receivers[(room, endpoint)] = r
        return r

    def lookup(self, room: int, endpoint: str) -> SessionReceiver | None:
        return self._receivers.get((room, endpoint))

    def live(self, room: int) -> bool:
        """Any receiver of `room` (from any prefill rank) is live."""
        with self._lock:
            return any(key[0] == room for key in self._receivers)

    def post(self, r: SessionReceiver | None, msg: SessionMsg, endpoint: str | None = None) -> None:
        """Queue `msg` to the session of r's prefill (opened on demand)."""
        endpoint = endpoint or (r.endpoint if r is not None else "")
        with self._lock:
            session = self._sessions.get(endpoint)
            if session is None or session.dead:
                session = DecodeSession(endpoint)
                self._sessions[endpoint] = session
                t = threading.Thread(target=self._writer, args=(session,), name="pd-decode-tx", daemon=True)
                session.threads.append(t)
                t.start()
            if r is not None and isinstance(msg, RoomInfo):
                r.session = session
                if self.mgr.one_sided:  # from now on the prefill may write into our pages
                    r.state.set_remote_writer(True)
            session.outbox.put((r, msg))  # under the lock: a session marked dead gets no more

    def fail_receiver(self, r: SessionReceiver, reason: str) -> None:
        if r.state.fail(reason) and r.session is not None and not r.session.dead:
            self.post(r, AbortRoom(room=r.room, reason=reason))

    def check(self, r: SessionReceiver) -> None:
        st = r.state
        if st.state in (KVPoll.Success, KVPoll.Failed):
            return
        now = time.monotonic()
        if not st.failing and r.init_at is not None and now - r.init_at > self.config.waiting_timeout:
            self.fail_receiver(r, f"timed out waiting for KV: no completion {self.config.waiting_timeout:g} s after init")
        if st.failing and st.remote_writer:
            session = r.session
            peer = session.peer if session is not None else None
            if peer is not None and process_gone(peer):
                st.set_remote_writer(False)
            elif (session is None or session.dead) and now - r.abort_at > ABORT_RETRY_S:
                r.abort_at = now  # ask again on a fresh session; its RoomFailed answer frees us
                self.post(None, AbortRoom(room=r.room, reason=st.failure or "aborted"), endpoint=r.endpoint)

    def peer_dead(self, endpoint: str, reason: str) -> None:
        with self._lock:
            session = self._sessions.get(endpoint)
            waiting = [r for r in self._receivers.values() if r.endpoint == endpoint]
        for r in waiting:
            r.state.fail(reason)
        if session is not None:
            self._session_lost(session, reason)

    def on_terminal(self, state: RoomState, endpoint: str) -> None:
        with self._lock:
            r = self._receivers.get((state.room, endpoint))
            if r is not None and r.state is state:
                del self._receivers[(state.room, endpoint)]

    # --- session threads ----------------------------------------------------------------------

    def _connect(self, session: DecodeSession) -> None:
        sock = FrameSocket.connect(session.endpoint, timeout=CONNECT_TIMEOUT_S,
                                   stall_timeout=max(10.0, self.config.heartbeat_deadline * 2))
        session.sock = sock
        sock.send(Hello(identity=self.mgr.identity, layout=self.mgr.layout, backend=self.mgr.backend_name,
                        token=self.config.cluster_token, region=self.mgr.hello_region()))
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S

        def idle() -> None:
            if time.monotonic() > deadline or self._closing.is_set() or session.dead:
                raise SessionClosed("no HelloAck from prefill")

        ack = sock.recv_msg(idle)
        if not isinstance(ack, HelloAck):
            raise SessionClosed(f"expected HelloAck, got {type(ack).__name__}")
        if ack.error is not None:
            raise SessionClosed(f"prefill refused the transfer session: {ack.error}")
        session.peer = ack.identity

    def _writer(self, session: DecodeSession) -> None:
        try:
            self._connect(session)
        except (OSError, SessionClosed) as exc:
            self._session_lost(session, f"cannot open a transfer session to {session.endpoint}: {exc}",
                               delivered=False)
            return
        reader = threading.Thread(target=self._reader, args=(session,), name="pd-decode-rx", daemon=True)
        session.threads.append(reader)
        reader.start()
        while True:
            item = session.outbox.get()
            if item is None or session.dead:
                return
            try:
                session.sock.send(item[1])  # type: ignore[union-attr]
            except SessionClosed as exc:
                self._session_lost(session, str(exc))
                return

    def _reader(self, session: DecodeSession) -> None:
        sock = session.sock
        assert sock is not None
        reason = "closed"
        try:
            while True:
                msg = sock.recv_msg()
                if isinstance(msg, DataFrame):
                    self.mgr.read_frame(sock, msg, self.lookup(msg.room, session.endpoint))
                elif isinstance(msg, Done):
                    self._on_done(session, sock, msg)
                elif isinstance(msg, RoomFailed):
                    self._on_room_failed(session, msg)
                else:
                    raise SessionClosed(f"unexpected {type(msg).__name__} from prefill")
        except SessionClosed as exc:
            reason = str(exc)
        except Exception as exc:
            logger.exception("prefill session reader crashed")
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._session_lost(session, reason)
            sock.dispose()

    def _on_room_failed(self, session: DecodeSession, msg: RoomFailed) -> None:
        r = self.lookup(msg.room, session.endpoint)
        if r is None:
            return
        r.state.fail(f"prefill failed the transfer: {msg.reason}")
        writer = r.session.peer if r.session is not None else None
        # RoomFailed proves "no write can land" only from the process that got our RoomInfo
        if writer is None or session.peer is None or session.peer.instance == writer.instance or process_gone(writer):
            r.state.set_remote_writer(False)

    def _on_done(self, session: DecodeSession, sock: FrameSocket, msg: Done) -> None:
        r = self.lookup(msg.room, session.endpoint)
        if r is None:
            return
        problem = self.mgr.check_done(r, msg)
        if problem is None and msg.metadata.room != r.room:
            problem = f"metadata record is for room {msg.metadata.room}, not {r.room}"
        r.record = msg.metadata
        if problem is not None:
            r.state.fail(problem)
            r.state.set_remote_writer(False)
            self.post(r, AbortRoom(room=r.room, reason=problem))  # the prefill stops waiting for our Ack
            return
        if r.state.succeed():
            sock.send(Ack(room=r.room))
        else:  # failing meanwhile: the prefill has finished writing, so the failure can settle
            r.state.set_remote_writer(False)

    def _session_lost(self, session: DecodeSession, reason: str, delivered: bool = True) -> None:
        with self._lock:
            if session.dead:
                return
            session.dead = True
            if self._sessions.get(session.endpoint) is session:
                del self._sessions[session.endpoint]
            hit = [r for r in self._receivers.values() if r.session is session]
        unsent: list[SessionReceiver] = []
        while True:  # messages never handed to the socket: their RoomInfo never reached prefill
            try:
                item = session.outbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] is not None and isinstance(item[1], RoomInfo):
                unsent.append(item[0])
        for r in hit:
            r.state.fail(f"lost the transfer session to prefill {session.endpoint}: {reason}")
            if not delivered or r in unsent or (session.peer is not None and process_gone(session.peer)):
                r.state.set_remote_writer(False)
        session.outbox.put(None)
        if session.sock is not None:
            session.sock.close()
            if not delivered:
                session.sock.dispose()

    def _housekeeping(self) -> None:
        while not self._closing.wait(HOUSEKEEPING_S):
            with self._lock:
                receivers = list(self._receivers.values())
            for r in receivers:
                self.check(r)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            receivers = list(self._receivers.values())
            sessions = list(self._sessions.values())
        for r in receivers:
            self.fail_receiver(r, "decode transfer manager closed")
        for session in sessions:  # writers send what is queued (the AbortRooms), then stop
            session.outbox.put(None)
        for session in sessions:
            if session.threads:
                session.threads[0].join(2.0)
        for session in sessions:
            self._session_lost(session, "decode transfer manager closed")
        for session in sessions:
            for t in session.threads:
                t.join(5.0)
        self._hk.join(5.0)
