"""Rank r's end of a tensor-parallel server's transfer channel: it runs rank 0's commands.

Lifecycle (rank r > 0, beside its model loop):
    agent = RankAgent(rank, manager, hub_address)   # DEALER to rank 0's hub; says RankHello
    ... thread: OpenSender / OpenReceiver / SendPages / AbortRank / PeerDead on its manager,
        a RankUpdate for each state change of each of its rooms, until StopAgent ...
    agent.join(timeout)                             # after rank 0's hub stopped it; closes the manager

A command that fails on this rank fails the room's part here (abort, or a Failed update when the
part never opened); rank 0's combined room then fails the room on every rank.
"""

from __future__ import annotations

import logging
import threading

import zmq

from pdserve.disagg.transfer.base import TERMINAL, KVPoll, KVReceiver, KVSender, TransferManager
from pdserve.disagg.transfer.rooms.all_of import link_receiver
from pdserve.disagg.transfer.tp.messages import (
    AbortRank,
    Command,
    OpenReceiver,
    OpenSender,
    PeerDead,
    RankHello,
    RankUpdate,
    SendPages,
    command_decoder,
    encode,
)

log = logging.getLogger(__name__)

POLL_MS = 10


class RankAgent:
    """Rank r's end: runs rank 0's commands on this rank's manager, reports state changes."""

    def __init__(self, rank: int, manager: TransferManager, address: str) -> None:
        self.rank, self.manager = rank, manager
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self._sock.send(encode(RankHello(rank, manager.endpoint, manager.layout)))
        self._rooms: dict[int, KVSender | KVReceiver] = {}
        self._last: dict[int, tuple[KVPoll, str | None]] = {}
        self._thread = threading.Thread(target=self._loop, name=f"tp-transfer-rank{rank}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                if self._sock.poll(POLL_MS):
                    if not self._handle(command_decoder.decode(self._sock.recv())):
                        return
                self._report()
        finally:
            self.manager.close()
            self._sock.close()
            self._ctx.term()

    def _handle(self, msg: Command) -> bool:
        try:
            if isinstance(msg, OpenSender):
                self._rooms[msg.room] = self.manager.sender(msg.room)
            elif isinstance(msg, OpenReceiver):
                r = link_receiver(self.manager, msg.room, msg.links)
                self._rooms[msg.room] = r
                r.init(msg.dst_pages, msg.decode_prefix_len)
            elif isinstance(msg, SendPages):
                s = self._rooms.get(msg.room)
                if isinstance(s, KVSender):
                    s.send(msg.src_pages, msg.start_page, msg.is_last, msg.metadata)
            elif isinstance(msg, AbortRank):
                part = self._rooms.get(msg.room)
                if part is not None:
                    part.abort()
            elif isinstance(msg, PeerDead):
                self.manager.peer_dead(msg.endpoint, msg.reason)
            else:
                return False
        except Exception as exc:  # this rank's part fails; rank 0 fails the room on every rank
            room = getattr(msg, "room", None)
            log.warning("tp rank %d: %s for room %s failed: %s", self.rank, type(msg).__name__, room, exc)
            if room is not None:
                part = self._rooms.get(room)
                if part is not None:
                    part.abort()
                else:
                    self._sock.send(encode(RankUpdate(room, int(KVPoll.Failed), f"rank {self.rank}: {exc}")))
        return True

    def _report(self) -> None:
        for room, part in list(self._rooms.items()):
            now = (part.poll(), part.failure)
            if now != self._last.get(room):
                self._last[room] = now
                failure = None if now[1] is None else f"rank {self.rank}: {now[1]}"
                self._sock.send(encode(RankUpdate(room, int(now[0]), failure)))
            if now[0] in TERMINAL:
                del self._rooms[room]
                self._last.pop(room, None)
