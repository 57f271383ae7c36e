"""Transfers of a tensor-parallel server: rank 0 drives every rank's transfer manager.

Each TP rank holds its own KV heads, so each rank runs a transfer manager over its own pool,
with its own endpoint (rank 0 registers them all with the bootstrap server). Rank 0's PD stage
sees one RankedManager whose rooms span every rank:

    rank 0 (engine thread)                        rank r (RankAgent thread)
    sender(room)       ── OpenSender ──────────▶  its sender(room)
    send(pages, ...)   ── SendPages ───────────▶  its send(pages, ...)
    open(room, sources).init(pages, decode_prefix_len)
                       ── OpenReceiver(links) ─▶  receivers of its links (tp_links.py), init(pages)
    abort()            ── AbortRank ───────────▶  its abort()
    peer_dead(...)     ── PeerDead ────────────▶  its peer_dead(...)
                       ◀── RankUpdate ──────────  each state change of a room, until terminal
    poll(): rank 0's own part combined with the ranks' last reported states (all_of.py)

Channel: a ZMQ ROUTER on rank 0, bound to the rendezvous host (its address goes through the TP
group's store), one DEALER per rank; msgspec frames, never pickle. The ROUTER belongs to one I/O
thread; other threads hand it commands through an inproc PAIR.

A rank may send pages as soon as SendPages arrives: rank 0 sends it after the forward that
computed them returned, and that forward's collectives (every layer all-reduces after its
attention, where each rank writes its KV) completed only once every rank had written them.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Protocol, Union

import msgspec
import zmq

from pdserve.disagg.bootstrap_client import BootstrapClient, PrefillAddr
from pdserve.disagg.messages import KVLayout, LinkSpec, MetadataRecord
from pdserve.disagg.transfer.base import TERMINAL, KVPoll, KVReceiver, KVSender, TransferManager
from pdserve.disagg.transfer.rooms.all_of import AllOfSender, Combined, link_receiver
from pdserve.disagg.transfer.tp.links import HeadRange, decode_links, head_range

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 120.0  # the other ranks load their weights before they say hello
POLL_MS = 10
STORE_KEY = "pdserve/tp_transfer"


class RankHello(msgspec.Struct, frozen=True, tag=True):
    rank: int
    endpoint: str
    layout: KVLayout


class OpenSender(msgspec.Struct, frozen=True, tag=True):
    room: int


class SendPages(msgspec.Struct, frozen=True, tag=True):
    room: int
    src_pages: list[int]
    start_page: int
    is_last: bool
    metadata: MetadataRecord | None


class OpenReceiver(msgspec.Struct, frozen=True, tag=True):
    room: int
    dst_pages: list[int]
    links: list[LinkSpec]
    decode_prefix_len: int = 0  # prompt tokens the decode holds: dst_pages are the pages past them


class AbortRank(msgspec.Struct, frozen=True, tag=True):
    room: int


class PeerDead(msgspec.Struct, frozen=True, tag=True):
    endpoint: str
    reason: str


class StopAgent(msgspec.Struct, frozen=True, tag=True):
    pass


class RankUpdate(msgspec.Struct, frozen=True, tag=True):
    room: int
    state: int
    failure: str | None


Command = Union[OpenSender, SendPages, OpenReceiver, AbortRank, PeerDead, StopAgent]
ToRank0 = Union[RankHello, RankUpdate]
_commands = msgspec.msgpack.Decoder(Command)
_to_rank0 = msgspec.msgpack.Decoder(ToRank0)
_encode = msgspec.msgpack.Encoder().encode


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
            msg = _to_rank0.decode(payload)
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
            self._outbox.send_multipart([self._ids[rank], _encode(msg)])

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
                msg = _to_rank0.decode(payload)
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


class ServerRooms(Protocol):
    """What a server's PD stage opens rooms with: its transfer manager(s) behind one face."""

    layout: KVLayout  # rank 0's pool

    @property
    def ranks(self) -> list[tuple[str, KVLayout]]:
        """(transfer endpoint, layout) of each rank, in rank order."""
        ...

    def sender(self, room: int) -> KVSender: ...

    def open(self, room: int, sources: list[tuple[str, HeadRange]]) -> KVReceiver:
        """A decode room fed by the prefill ranks in `sources` (endpoint, heads), in rank order."""
        ...

    def watch(self, client: BootstrapClient) -> None: ...

    def close(self) -> None: ...


def model_page_bytes(layout: KVLayout) -> int:
    """Bytes of one page over every KV head of the model (all ranks together)."""
    return layout.page_bytes * layout.all_kv_heads // layout.kv_heads


class LocalRooms:
    """A server of one rank: its manager, links from every prefill rank into its pool."""

    def __init__(self, manager: TransferManager) -> None:
        self.manager, self.layout = manager, manager.layout

    @property
    def ranks(self) -> list[tuple[str, KVLayout]]:
        return [(self.manager.endpoint, self.layout)]

    def sender(self, room: int) -> KVSender:
        return self.manager.sender(room)

    def open(self, room: int, sources: list[tuple[str, HeadRange]]) -> KVReceiver:
        links = decode_links(sources, [head_range(self.layout)], self.layout.all_kv_heads)
        return link_receiver(self.manager, room, links[0])

    def watch(self, client: BootstrapClient) -> None:
        self.manager.watch(client)

    def close(self) -> None:
        self.manager.close()


class RankedManager:
    """Rank 0's transfer manager over every rank of a tensor-parallel server."""

    def __init__(self, local: TransferManager, hub: RankHub) -> None:
        self.local, self.hub = local, hub
        self.layout = local.layout
        self.num_ranks = len(hub.hellos) + 1
        self._ranks: list[tuple[str, KVLayout]] = [(local.endpoint, local.layout)] + [
            (hub.hellos[r].endpoint, hub.hellos[r].layout) for r in range(1, self.num_ranks)]

    @property
    def ranks(self) -> list[tuple[str, KVLayout]]:
        return self._ranks

    def sender(self, room: int) -> KVSender:
        local = self.local.sender(room)
        views = [self.hub.view(r, room) for r in range(1, self.num_ranks)]
        for r in range(1, self.num_ranks):
            self.hub.command(r, OpenSender(room))
        return AllOfSender(room, local, list(views), self)

    def send(self, room: int, src_pages: list[int], start_page: int, is_last: bool,
             metadata: MetadataRecord | None) -> None:
        for r in range(1, self.num_ranks):
            self.hub.command(r, SendPages(room, list(src_pages), start_page, is_last, metadata))

    def open(self, room: int, sources: list[tuple[str, HeadRange]]) -> KVReceiver:
        links = decode_links(sources, [head_range(layout) for _, layout in self._ranks], self.layout.all_kv_heads)
        return RankedReceiver(self, room, link_receiver(self.local, room, links[0]), links)

    def peer_dead(self, endpoint: str, reason: str) -> None:
        self.local.peer_dead(endpoint, reason)
        for r in range(1, self.num_ranks):
            self.hub.command(r, PeerDead(endpoint, reason))

    def watch(self, client: BootstrapClient) -> None:
        """Decode: a prefill the heartbeat declares dead fails its rooms on every rank."""
        def on_dead(addr: PrefillAddr, endpoints: list[str], reason: str) -> None:
            for endpoint in endpoints:
                self.peer_dead(endpoint, f"prefill {addr.host}:{addr.port} {reason}")

        client.add_dead_callback(on_dead)

    def close(self) -> None:
        self.hub.close()
        self.local.close()


class RankedReceiver(KVReceiver):
    def __init__(self, mgr: RankedManager, room: int, local: KVReceiver, links: list[list[LinkSpec]]) -> None:
        self.room, self._mgr, self._local, self._links = room, mgr, local, links
        self._views = [mgr.hub.view(r, room) for r in range(1, mgr.num_ranks)]
        self._all = Combined([local, *self._views])

    def init(self, dst_pages: list[int], decode_prefix_len: int = 0) -> None:
        self._local.init(dst_pages, decode_prefix_len)
        for r in range(1, self._mgr.num_ranks):
            self._mgr.hub.command(r, OpenReceiver(self.room, list(dst_pages), self._links[r], decode_prefix_len))

    def poll(self) -> KVPoll:
        return self._all.poll()

    def metadata(self) -> MetadataRecord | None:
        return self._local.metadata() if self.poll() == KVPoll.Success else None

    def abort(self) -> None:
        self._all.abort_all("aborted by decode")

    @property
    def failure(self) -> str | None:
        return self._all.failure


class RankAgent:
    """Rank r's end: runs rank 0's commands on this rank's manager, reports state changes."""

    def __init__(self, rank: int, manager: TransferManager, address: str) -> None:
        self.rank, self.manager = rank, manager
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self._sock.send(_encode(RankHello(rank, manager.endpoint, manager.layout)))
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
                    if not self._handle(_commands.decode(self._sock.recv())):
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
                    self._sock.send(_encode(RankUpdate(room, int(KVPoll.Failed), f"rank {self.rank}: {exc}")))
        return True

    def _report(self) -> None:
        for room, part in list(self._rooms.items()):
            now = (part.poll(), part.failure)
            if now != self._last.get(room):
                self._last[room] = now
                failure = None if now[1] is None else f"rank {self.rank}: {now[1]}"
                self._sock.send(_encode(RankUpdate(room, int(now[0]), failure)))
            if now[0] in TERMINAL:
                del self._rooms[room]
                self._last.pop(room, None)


