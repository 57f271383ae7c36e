"""Prefill side of the two-sided control plane: sessions from decode ranks, senders, the queues.

Lifecycle of one room on the prefill rank (state in brackets):

  1. `sender(room)` [Bootstrapping]. Decode's RoomInfo may come before or after it: those that
     come first wait in `_pending` (dropped with a RoomFailed after bootstrap_timeout). An
     AbortRoom that comes first (the client left while this busy engine had not taken the
     request yet) is remembered (rooms/memory.py) for bootstrap_timeout, so the sender, when
     it is created, fails at once instead of waiting for a page list that never comes.
  2. RoomInfo of every destination bound [WaitingForInput] (rooms/sender.py: one per decode rank
     fed by this rank); `num_dst_pages` is known.
  3. `send(...)` [Transferring]: a task per destination goes to the shard queue of that decode
     (FCFS per decode);
     the consumer moves the pages (the backend's `write_pages`) inside begin_write/end_write, and
     after the is_last task sends Done(room, frames, metadata).
  4. Every destination's Ack [Success]. Failures [Failed]: abort(), AbortRoom from decode, the session
     dropping (decode died), bootstrap_timeout without RoomInfo, no Ack within waiting_timeout
     after the last send, a send error or an injected failure. A failure that decode may not know
     about yet is told with RoomFailed, sent from the room's shard after any write in hand, so it
     also means "no write of this room can land any more" (what one-sided decode waits for).

Threads: an acceptor, one reader per decode session, a housekeeper (timeouts), the shard
consumers. The engine thread only calls sender/send/poll/abort, which never block.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdserve.disagg.messages import Ack, AbortRoom, Done, Hello, HelloAck, RoomFailed, RoomInfo
from pdserve.disagg.transfer.base import KVPoll
from pdserve.disagg.transfer.rooms.memory import RoomMemory
from pdserve.disagg.transfer.rooms.sender import Destination, PrefillSession, SendTask, SessionSender
from pdserve.disagg.transfer.rooms.state import RoomState
from pdserve.disagg.transfer.sessions.data_path import DataPath
from pdserve.disagg.transfer.sessions.handshake import refusal
from pdserve.disagg.transfer.sessions.shards import ShardedQueues
from pdserve.disagg.transfer.sessions.wire import FrameSocket, SessionClosed, advertised_host, join_endpoint, listen


logger = logging.getLogger("pdserve.disagg.prefill")

HOUSEKEEPING_S = 0.25
HANDSHAKE_TIMEOUT_S = 10.0


class InjectedFailure(RuntimeError):
    pass


class SendSessions:
    def __init__(self, mgr: DataPath, port: int, advertise_host: str | None) -> None:
        self.mgr = mgr
        self.config = mgr.config
        self._listener = listen(mgr.host, port)
        bound_port = self._listener.getsockname()[1]
        self.endpoint = join_endpoint(advertise_host or advertised_host(mgr.host), bound_port)
        self._lock = threading.Lock()
        self._senders: dict[int, SessionSender] = {}
        self._pending: dict[int, list[tuple[PrefillSession, RoomInfo, float]]] = {}
        self._memory = RoomMemory(self.config.bootstrap_timeout)  # ended rooms, aborts before a sender
        self._sessions: set[PrefillSession] = set()
        self._closing = threading.Event()
        self.queues = ShardedQueues(self.config.queue_size, self.config.thread_pool_size, "pd-send")
        self._threads = [threading.Thread(target=self._accept_loop, name="pd-accept", daemon=True),
                         threading.Thread(target=self._housekeeping, name="pd-prefill-hk", daemon=True)]
        for t in self._threads:
            t.start()

    # --- engine-facing ------------------------------------------------------------------------

    def sender(self, room: int) -> SessionSender:
        with self._lock:
            if room in self._senders:
                raise ValueError(f"room {room} already has a live sender")
            s = SessionSender(self, room)
            self._senders[room] = s
            pending = self._pending.pop(room, [])
            early = self._memory.take_abort(room)
            refused = [] if early is not None else [(session, s.bind(session, info)) for session, info, _ in pending]
        if early is not None:  # decode gave this room up before we had it: nothing was written
            logger.info("room %d: decode gave it up before the request reached this engine (%s)", room, early)
            s.state.fail(f"decode gave up before the request arrived: {early}")
        for session, why in refused:
            if why is not None:
                self._send_quietly(session, RoomFailed(room=room, reason=why))
        return s

    def submit(self, session: PrefillSession, task: Any) -> None:
        self.queues.submit(session.key, task)

    def fail_sender(self, s: SessionSender, reason: str, reply_to: PrefillSession | None = None) -> None:
        """Fail a room; tell decode with RoomFailed once no write of it is in hand (the notice
        runs on the room's shard, after the task in hand). `reply_to` answers an AbortRoom."""
        first = s.state.fail(reason)
        targets = [d.session for d in s.dests] if first else []
        if reply_to is not None and reply_to not in targets:
            targets.append(reply_to)
        notice = RoomFailed(room=s.room, reason=s.failure or reason)
        for target in targets:
            if target.sock.closed:
                continue
            if not s.serves(target):  # no RoomInfo of it bound: nothing was ever written there
                self._send_quietly(target, notice)
                continue
            try:
                self.submit(target, lambda ex, t=target: self._send_quietly(t, notice))
            except RuntimeError:  # queues closed
                pass

    def check_timeouts(self, s: SessionSender) -> None:
        if s.state.failing or s.state.state in (KVPoll.Success, KVPoll.Failed):
            return
        now = time.monotonic()
        if not s.ready and now - s.created > self.config.bootstrap_timeout:
            self.fail_sender(s, f"bootstrap timeout: decode's page list did not arrive within "
                                f"{self.config.bootstrap_timeout:g} s")
        elif s.last_at is not None and now - s.last_at > self.config.waiting_timeout:
            self.fail_sender(s, f"decode did not acknowledge the transfer within {self.config.waiting_timeout:g} s")

    def on_terminal(self, state: RoomState) -> None:
        with self._lock:
            s = self._senders.get(state.room)
            if s is not None and s.state is state:
                del self._senders[state.room]
            self._memory.end(state.room, state.failure or "succeeded")

    # --- shard consumers ----------------------------------------------------------------------

    def run_send(self, s: SessionSender, dest: Destination, task: SendTask,
                 executor: ThreadPoolExecutor | None) -> None:
        session = dest.session
        if not s.state.begin_write():
            return
        error: str | None = None
        try:
            if self.config.fail_rate > 0 and random.Random(s.room * 1000003 + task.seq).random() < self.config.fail_rate:
                raise InjectedFailure(f"injected transfer failure (fail_rate={self.config.fail_rate:g})")
            if task.runs:
                dest.frames += self.mgr.write_pages(session.sock, session.region, s.room, task.runs, executor,
                                                    dest.heads)
            if task.is_last:
                assert task.metadata is not None
                session.sock.send(Done(room=s.room, num_frames=dest.frames, metadata=task.metadata))
        except SessionClosed as exc:
            s.state.fail(f"decode connection lost: {exc}")
        except Exception as exc:  # a backend error (or an injected one) fails this room only
            error = str(exc) if isinstance(exc, InjectedFailure) else f"{type(exc).__name__}: {exc}"
        finally:
            s.state.end_write()
        if error is not None:
            self.fail_sender(s, f"transfer failed: {error}")

    @staticmethod
    def _send_quietly(session: PrefillSession, msg: RoomFailed) -> None:
        try:
            session.sock.send(msg)
        except SessionClosed:
            pass

    # --- sessions -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            session = PrefillSession(FrameSocket(sock, stall_timeout=max(10.0, 2 * self.config.heartbeat_deadline)))
            session.thread = threading.Thread(target=self._serve, args=(session,), name="pd-prefill-rx", daemon=True)
            with self._lock:
                self._sessions.add(session)
            session.thread.start()

    def _handshake(self, session: PrefillSession) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S

        def idle() -> None:
            if time.monotonic() > deadline or self._closing.is_set():
                raise SessionClosed("no Hello from decode")

        hello = session.sock.recv_msg(idle)
        if not isinstance(hello, Hello):
            raise SessionClosed(f"expected Hello, got {type(hello).__name__}")
        error = refusal(hello, self.config.cluster_token, self.mgr.backend_name, self.mgr.layout)
        if error is None:
            try:
                session.region = self.mgr.open_region(hello)
            except Exception as exc:
                error = f"prefill cannot reach decode memory: {exc}"
        session.sock.send(HelloAck(identity=self.mgr.identity, error=error))
        if error is not None:
            raise SessionClosed(error)
        session.key, session.peer = hello.identity.instance, hello.identity

    def _serve(self, session: PrefillSession) -> None:
        reason = "closed"
        try:
            self._handshake(session)
            while True:
                msg = session.sock.recv_msg()
                if isinstance(msg, RoomInfo):
                    self._on_room_info(session, msg)
                elif isinstance(msg, AbortRoom):
                    self._on_abort(session, msg)
                elif isinstance(msg, Ack):
                    self._on_ack(session, msg)
                else:
                    raise SessionClosed(f"unexpected {type(msg).__name__} from decode")
        except SessionClosed as exc:
            reason = str(exc)
        except Exception as exc:  # never let a reader die silently
            logger.exception("decode session reader crashed")
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._session_lost(session, reason)

    def _on_room_info(self, session: PrefillSession, info: RoomInfo) -> None:
        reply: str | None = None
        with self._lock:
            s = self._senders.get(info.room)
            if s is None:
                pending = self._pending.setdefault(info.room, [])
                if info.room in self._memory.ended:
                    reply = f"prefill already ended this room ({self._memory.ended[info.room]})"
                elif any(sess is session for sess, _, _ in pending):
                    reply = "duplicate RoomInfo"
                else:
                    pending.append((session, info, time.monotonic()))
                if not pending:
                    del self._pending[info.room]
            else:
                reply = s.bind(session, info)
        if reply is not None:
            self._send_quietly(session, RoomFailed(room=info.room, reason=reply))

    def _on_abort(self, session: PrefillSession, msg: AbortRoom) -> None:
        with self._lock:
            s = self._senders.get(msg.room)
            self._pending.pop(msg.room, None)
            if s is None and msg.room not in self._memory.ended:  # its sender may still come
                self._memory.abort_early(msg.room, msg.reason, time.monotonic())
        if s is None:  # unknown or ended: nothing can be writing it
            self._send_quietly(session, RoomFailed(room=msg.room, reason=f"decode gave up: {msg.reason}"))
        else:
            self.fail_sender(s, f"decode gave up: {msg.reason}", reply_to=session)

    def _on_ack(self, session: PrefillSession, msg: Ack) -> None:
        with self._lock:
            s = self._senders.get(msg.room)
        if s is not None:
            s.acked(session)

    def _session_lost(self, session: PrefillSession, reason: str) -> None:
        with self._lock:
            self._sessions.discard(session)
            hit = [s for s in self._senders.values() if s.serves(session)]
            for room, items in list(self._pending.items()):
                items[:] = [item for item in items if item[0] is not session]
                if not items:
                    del self._pending[room]
        for s in hit:
            s.state.fail(f"decode connection lost: {reason}")
        session.sock.dispose()
        if session.region is not None:
            self.mgr.close_region(session.region)
        if hit and not self._closing.is_set():
            logger.warning("decode session lost (%s); failed %d room(s)", reason, len(hit))

    def _housekeeping(self) -> None:
        while not self._closing.wait(HOUSEKEEPING_S):
            with self._lock:
                senders = list(self._senders.values())
                now = time.monotonic()
                expired = [(room, sess) for room, items in self._pending.items()
                           if now - items[0][2] > self.config.bootstrap_timeout for sess, _, _ in items]
                for room in {room for room, _ in expired}:
                    del self._pending[room]
                self._memory.expire(now)
            for s in senders:
                self.check_timeouts(s)
            for room, sess in expired:
                self._send_quietly(sess, RoomFailed(room=room, reason="prefill never got this request within "
                                                                      f"{self.config.bootstrap_timeout:g} s"))

    # --- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor at once
        except OSError:
            pass
        with self._lock:
            senders = list(self._senders.values())
        for s in senders:
            self.fail_sender(s, "prefill transfer manager closed")
        self.queues.close()  # runs the RoomFailed notices; sends of failed rooms are skipped
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.sock.close()
        for session in sessions:
            if session.thread is not None:
                session.thread.join(5.0)
        for t in self._threads:
            t.join(5.0)
        self._listener.close()

