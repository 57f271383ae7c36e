"""A room made of several parts that must all succeed: the links of one decode rank (several
prefill ranks write into its pages), or the ranks of one tensor-parallel server.

Lifecycle: built from live parts (each a sender, receiver or remote rank's view with poll(),
abort() and failure); `poll()` combines them:

    every part Success                      -> Success
    a part Failed (or failing)              -> abort every other part once; report Failed only
                                               when EVERY part is terminal (no write can land)
    otherwise                               -> the least advanced part's state

so the engine frees or commits pages exactly as for a single room.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.disagg.messages import HeadSlice, LinkSpec, MetadataRecord
from pdserve.disagg.transfer.base import TERMINAL, KVPoll, KVReceiver, KVSender


class Part(Protocol):
    def poll(self) -> KVPoll: ...

    def abort(self) -> None: ...

    @property
    def failure(self) -> str | None: ...


class Combined:
    def __init__(self, parts: list[Part]) -> None:
        if not parts:
            raise ValueError("a combined room needs at least one part")
        self.parts = parts
        self._aborted = False
        self._failure: str | None = None

    def poll(self) -> KVPoll:
        states = [p.poll() for p in self.parts]
        failed = [p for p, s in zip(self.parts, states) if s == KVPoll.Failed or p.failure is not None]
        if failed and self._failure is None:
            self._failure = failed[0].failure or "a part of the room failed"
        if self._failure is not None:
            self.abort_all()
            if all(s in TERMINAL for s in states):
                return KVPoll.Failed
            return min(s for s in states if s not in TERMINAL)
        if all(s == KVPoll.Success for s in states):
            return KVPoll.Success
        return min(states)

    def abort_all(self, reason: str | None = None) -> None:
        if reason is not None and self._failure is None:
            self._failure = reason
        if not self._aborted:
            self._aborted = True
            for p in self.parts:
                p.abort()

    @property
    def failure(self) -> str | None:
        return self._failure


class AllOfReceiver(KVReceiver):
    """One decode rank's room fed by several prefill ranks (parts share the page ids)."""

    def __init__(self, room: int, parts: list[KVReceiver]) -> None:
        self.room = room
        self._parts = parts
        self._all = Combined(list(parts))

    def init(self, dst_pages: list[int], decode_prefix_len: int = 0) -> None:
        for p in self._parts:
            p.init(dst_pages, decode_prefix_len)

    def poll(self) -> KVPoll:
        return self._all.poll()

    def metadata(self) -> MetadataRecord | None:
        return self._parts[0].metadata() if self.poll() == KVPoll.Success else None

    def abort(self) -> None:
        self._all.abort_all("aborted by decode")

    @property
    def failure(self) -> str | None:
        return self._all.failure


class AllOfSender(KVSender):
    """A tensor-parallel prefill's room: rank 0's own sender plus the other ranks' views.
    Sends go to `local` here; `fan_out` forwards them to the other ranks (tp/ranked.py)."""

    def __init__(self, room: int, local: KVSender, others: list[Part], fan_out: FanOut) -> None:
        self.room = room
        self._local = local
        self._all = Combined([local, *others])
        self._fan_out = fan_out

    @property
    def num_dst_pages(self) -> int | None:
        return self._local.num_dst_pages

    @property
    def decode_prefix_len(self) -> int | None:
        return self._local.decode_prefix_len

    def poll(self) -> KVPoll:
        return self._all.poll()

    def send(self, src_pages: list[int], start_page: int, is_last: bool,
             metadata: MetadataRecord | None = None) -> None:
        self._local.send(src_pages, start_page, is_last, metadata)
        self._fan_out.send(self.room, src_pages, start_page, is_last, metadata)

    def abort(self) -> None:
        self._all.abort_all("aborted by prefill")

    @property
    def failure(self) -> str | None:
        return self._all.failure or self._local.failure


class FanOut(Protocol):
    def send(self, room: int, src_pages: list[int], start_page: int, is_last: bool,
             metadata: MetadataRecord | None) -> None: ...


class LinkOpener(Protocol):
    def receiver(self, room: int, prefill_endpoint: str, heads: HeadSlice | None = None,
                 fanout: int = 1) -> KVReceiver: ...


def link_receiver(manager: LinkOpener, room: int, links: list[LinkSpec]) -> KVReceiver:
    """This rank's receiver of a room over its links: a plain one, or all of them."""
    parts: list[KVReceiver] = []
    try:
        for link in links:
            parts.append(manager.receiver(room, link.endpoint, link.heads, link.fanout))
    except BaseException:
        for p in parts:
            p.abort()
        raise
    return parts[0] if len(parts) == 1 else AllOfReceiver(room, parts)
