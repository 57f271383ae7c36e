"""One room on a prefill rank: the engine's handle (SessionSender) and its destinations.

A room has one destination per decode rank that takes pages from this prefill rank: one
without tensor parallelism; with TP of different sizes up to the decode's tp (tp/links.py).
Each decode rank's RoomInfo binds one Destination (its session, its page ids, its head slice)
and says how many there are in all (`fanout`); the room is WaitingForInput once all are bound.

    RoomInfo(d0) ─┐                    send(pages, start) ──▶ one task per destination, each on
    RoomInfo(d1) ─┴▶ bound == fanout      its decode's shard queue: write its slice, then Done
                     [WaitingForInput]  Ack from every destination ──▶ [Success]
    a failure of any destination fails the room; RoomFailed goes to every destination.

A decode with a prefix cache names only the pages past the prompt tokens it holds
(RoomInfo.decode_prefix_len, the same on every decode rank): `send` takes prompt page indices and
drops the pages below that prefix here, once for every backend and head slice, so a chunk with
no page past the prefix moves nothing (the last send still carries the metadata: Done).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.disagg.messages import HeadSlice, MetadataRecord, RoomInfo
from pdserve.disagg.transfer.backends.pages import Run, check_pages, page_runs
from pdserve.disagg.transfer.base import KVPoll, KVSender
from pdserve.disagg.transfer.rooms.state import RoomState
from pdserve.disagg.transfer.sessions.data_path import DataPath
from pdserve.disagg.transfer.sessions.wire import FrameSocket
from pdserve.disagg.transfer.tp.links import check_slice


@dataclass(eq=False)
class PrefillSession:
    sock: FrameSocket
    key: str = ""  # the decode manager's instance id: picks the shard queue
    region: Any = None  # what the backend opened for this decode (shm: mapped pool)
    peer: Any = None  # decode's PeerIdentity
    thread: threading.Thread | None = None


@dataclass(eq=False)
class Destination:
    session: PrefillSession
    dst_pages: list[int]
    heads: HeadSlice | None  # None: every head
    frames: int = 0  # data frames sent to it (its shard consumer only)
    acked: bool = False


@dataclass(frozen=True)
class SendTask:
    runs: list[Run]
    is_last: bool
    metadata: MetadataRecord | None
    seq: int


class SenderSide(Protocol):
    """What a room needs of SendSessions (sessions/send.py), which owns the rooms."""

    mgr: DataPath

    def on_terminal(self, state: RoomState) -> None: ...

    def check_timeouts(self, s: SessionSender) -> None: ...

    def fail_sender(self, s: SessionSender, reason: str, reply_to: PrefillSession | None = None) -> None: ...

    def submit(self, session: PrefillSession, task: Any) -> None: ...

    def run_send(self, s: SessionSender, dest: Destination, task: SendTask,
                 executor: ThreadPoolExecutor | None) -> None: ...


class SessionSender(KVSender):
    """A room's handle for the engine thread; SendSessions keeps its public fields (the room's record)."""

    def __init__(self, side: SenderSide, room: int) -> None:
        self.room = room
        self._side = side
        self.state = RoomState(room, on_terminal=side.on_terminal)
        self.created = time.monotonic()
        self.dests: list[Destination] = []
        self.fanout: int | None = None  # destinations in all, from the first RoomInfo
        self.prefix_pages = 0  # prompt pages the decode holds (RoomInfo.decode_prefix_len / page_size)
        self._tasks = 0
        self.last_at: float | None = None  # when the is_last send was queued

    @property
    def ready(self) -> bool:
        return self.fanout is not None and len(self.dests) == self.fanout

    @property
    def num_dst_pages(self) -> int | None:
        return len(self.dests[0].dst_pages) if self.ready else None

    @property
    def decode_prefix_len(self) -> int | None:
        return self.prefix_pages * self._side.mgr.layout.page_size if self.ready else None

    @property
    def failure(self) -> str | None:
        return self.state.failure

    def serves(self, session: PrefillSession) -> bool:
        return any(d.session is session for d in self.dests)

    def bind(self, session: PrefillSession, info: RoomInfo) -> str | None:
        """Add the destination of a decode rank's RoomInfo; returns why it is refused, or None."""
        if self.ready or self.serves(session):
            return "duplicate RoomInfo"
        if self.fanout is not None and info.fanout != self.fanout:
            return f"decode ranks disagree on the fanout of room {self.room} ({info.fanout} != {self.fanout})"
        if self.dests and len(info.dst_pages) != len(self.dests[0].dst_pages):
            return f"decode ranks reserved {len(info.dst_pages)} and {len(self.dests[0].dst_pages)} pages"
        page_size = self._side.mgr.layout.page_size
        if info.decode_prefix_len < 0 or info.decode_prefix_len % page_size:
            return f"decode_prefix_len {info.decode_prefix_len} is not a whole number of {page_size}-token pages"
        if self.dests and info.decode_prefix_len != self.prefix_pages * page_size:
            return (f"decode ranks hold different prefixes of room {self.room} "
                    f"({info.decode_prefix_len} != {self.prefix_pages * page_size} tokens)")
        if info.heads is not None:
            try:
                check_slice(info.heads, self._side.mgr.layout.kv_heads, info.heads.dst_start + info.heads.count)
            except ValueError as exc:
                return str(exc)
        self.fanout = max(1, info.fanout)
        self.prefix_pages = info.decode_prefix_len // page_size
        self.dests.append(Destination(session, list(info.dst_pages), info.heads))
        if self.ready:
            self.state.advance(KVPoll.WaitingForInput)
        return None

    def poll(self) -> KVPoll:
        self._side.check_timeouts(self)
        return self.state.poll()

    def send(self, src_pages: list[int], start_page: int, is_last: bool,
             metadata: MetadataRecord | None = None) -> None:
        if is_last != (metadata is not None):
            raise ValueError("send(): metadata is required with is_last=True and only then")
        if metadata is not None and metadata.room != self.room:
            raise ValueError(f"metadata.room {metadata.room} != sender room {self.room}")
        if self.last_at is not None:
            raise RuntimeError(f"room {self.room}: send() after the is_last send")
        check_pages(list(src_pages), self._side.mgr.num_pages, "source")
        if is_last:
            self.last_at = time.monotonic()
        if self.state.failing or self.state.state == KVPoll.Failed:
            return
        if not self.ready:
            raise RuntimeError(f"room {self.room}: send() before decode's page list arrived "
                               "(wait for poll() == WaitingForInput)")
        if start_page < 0:
            self._side.fail_sender(self, f"send(): start_page {start_page} < 0")
            return
        skip = max(0, self.prefix_pages - start_page)  # pages the decode holds already: never sent
        src_pages, start_page = list(src_pages)[skip:], start_page + skip - self.prefix_pages
        end = start_page + len(src_pages)
        if end > len(self.dests[0].dst_pages):
            self._side.fail_sender(self, f"pages [{start_page}, {end}) past decode's prefix exceed the "
                                         f"{len(self.dests[0].dst_pages)} pages it reserved")
            return
        if not src_pages and not is_last:
            return
        self.state.advance(KVPoll.Transferring)
        for dest in self.dests:
            empty = dest.heads is not None and dest.heads.count == 0  # a rank whose heads nobody needs
            runs = [] if empty else page_runs(list(src_pages), dest.dst_pages[start_page:end])
            task = SendTask(runs, is_last, metadata, self._tasks)
            self._side.submit(dest.session, lambda ex, d=dest, t=task: self._side.run_send(self, d, t, ex))
        self._tasks += 1

    def acked(self, session: PrefillSession) -> None:
        """An Ack from one destination; Success once every destination acked the last send."""
        if self.last_at is None:
            return
        for d in self.dests:
            if d.session is session:
                d.acked = True
        if self.ready and all(d.acked for d in self.dests):
            self.state.succeed()

    def abort(self) -> None:
        self._side.fail_sender(self, "aborted by prefill")

    def _wait_change(self, timeout: float, seen: KVPoll) -> None:
        self.state.wait_change(timeout, seen)
