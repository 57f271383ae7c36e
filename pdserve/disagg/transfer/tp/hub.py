"""Rank 0's end of a tensor-parallel server's transfer channel: the hub and its views of rooms.

Lifecycle (rank 0):
    hub = RankHub(host, num_ranks, publish)   # binds a ROUTER, publishes its address (STORE_KEY),
                                              # waits for every other rank's RankHello
    view = hub.view(rank, room)               # a room's part on rank r: its last reported state
    hub.command(rank, OpenSender(room))       # any thread
    ... RankUpdate frames move the views until terminal (then the hub forgets them) ...
    hub.close()                               # StopAgent to every rank, then the sockets

Threads: the ROUTER belongs to one I/O thread (`_serve`); other threads hand it commands
through an inproc PAIR, so no socket is ever used by two threads.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import zmq

from pdserve.disagg.transfer.base import TERMINAL, KVPoll
from pdserve.disagg.transfer.tp.messages import (
    STORE_KEY,
    AbortRank,
    Command,
    RankHello,
    RankUpdate,
    StopAgent,
    encode,
    to_rank0_decoder,
)

HELLO_TIMEOUT_S = 120.0  # the other ranks load their weights before they say hello


class RankView:
    """Rank 0's view of one room on another rank: the last state that rank reported."""

    def __init__(self, hub: RankHub, rank: int, room: int) -> None:
        self.hub, self.rank, self.room = hub, rank, room
        self.state = KVPoll.Bootstrapping
        self._failure: str | None = None
        self._aborted = False

    def update(self, msg: RankUpdate) -> None:
        self._failure = self._failure or msg.failure
        self.state = KVPoll(msg.state)

    def poll(self) -> KVPoll:
        return self.state

    def abort(self) -> None:
        if not self._aborted and self.state not in TERMINAL:
            self._aborted = True
            self.hub.command(self.rank, AbortRank(self.room))

    @property
    def failure(self) -> str | None:
        return self._failure


class RankHub:
    """Rank 0's end of the channel: the ROUTER, its I/O thread, the live views."""

    def __init__(self, host: str, num_ranks: int, publish: Callable[[str, str], object]) -> None:
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        inproc = f"inproc://tp-transfer-{uuid.uuid4().hex}"
        self._inbox = self._ctx.socket(zmq.PAIR)
        self._inbox.bind(inproc)
        self._outbox = self._ctx.socket(zmq.PAIR)
        self._outbox.connect(inproc)
        self._lock = threading.Lock()
        self._views: dict[tuple[int, int], RankView] = {}
        self._ids: dict[int, bytes] = {}
        self.hellos: dict[int, RankHello] = {}
        publish(STORE_KEY, f"tcp://{host}:{port}")
        self._await_hellos(num_ranks - 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tp-transfer-hub", daemon=True)
        self._thread.start()

    def _await_hellos(self, n: int) -> None:
        while len(self.hellos) < n:
            if not self._router.poll(int(HELLO_TIMEOUT_S * 1000)):
                raise TimeoutError(f"tensor-parallel ranks did not start their transfer managers within "
                                   f"{HELLO_TIMEOUT_S:g} s ({len(self.hellos)} of {n})")
            ident, payload = self._router.recv_multipart()
            msg = to_rank0_decoder.decode(payload)
            if isinstance(msg, RankHello):
                self.hellos[msg.rank] = msg
                self._ids[msg.rank] = ident

    def view(self, rank: int, room: int) -> RankView:
        v = RankView(self, rank, room)
        with self._lock:
            self._views[(rank, room)] = v
        return v

    def command(self, rank: int, msg: Command) -> None:
        with self._lock:  # any thread; the I/O thread forwards it
            self._outbox.send_multipart([self._ids[rank], encode(msg)])

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                if sock is self._inbox:
                    self._router.send_multipart(self._inbox.recv_multipart())
                    continue
                ident, payload = self._router.recv_multipart()
                rank = next((r for r, i in self._ids.items() if i == ident), -1)
                msg = to_rank0_decoder.decode(payload)
                if isinstance(msg, RankUpdate):
                    with self._lock:
                        v = self._views.get((rank, msg.room))
                        if v is not None and KVPoll(msg.state) in TERMINAL:
                            del self._views[(rank, msg.room)]
                    if v is not None:
                        v.update(msg)

    def close(self) -> None:
        for rank in list(self._ids):
            self.command(rank, StopAgent())
        self._stop.set()
        self._thread.join(5.0)
        for s in (self._router, self._inbox, self._outbox):
            s.close(linger=0)
        self._ctx.term()
