"""Rank 0's transfer manager over every rank of a tensor-parallel server (one ServerRooms).

Each TP rank holds its own KV heads, so each rank runs a transfer manager over its own pool,
with its own endpoint (rank 0 registers them all with the bootstrap server). Rank 0's PD stage
sees one RankedManager whose rooms span every rank:

    rank 0 (engine thread)                        rank r (RankAgent thread, agent.py)
    sender(room)       ── OpenSender ──────────▶  its sender(room)
    send(pages, ...)   ── SendPages ───────────▶  its send(pages, ...)
    open(room, sources).init(pages, decode_prefix_len)
                       ── OpenReceiver(links) ─▶  receivers of its links (links.py), init(pages)
    abort()            ── AbortRank ───────────▶  its abort()
    peer_dead(...)     ── PeerDead ────────────▶  its peer_dead(...)
                       ◀── RankUpdate ──────────  each state change of a room, until terminal
    poll(): rank 0's own part combined with the ranks' last reported states (rooms/all_of.py)

The channel is hub.py's (frames in messages.py). A rank may send pages as soon as SendPages
arrives: rank 0 sends it after the forward that computed them returned, and that forward's
collectives (every layer all-reduces after its attention, where each rank writes its KV)
completed only once every rank had written them.
"""

from __future__ import annotations

from pdserve.disagg.bootstrap_client import BootstrapClient, PrefillAddr
from pdserve.disagg.messages import KVLayout, LinkSpec, MetadataRecord
from pdserve.disagg.transfer.base import KVPoll, KVReceiver, KVSender, TransferManager
from pdserve.disagg.transfer.rooms.all_of import AllOfSender, Combined, link_receiver
from pdserve.disagg.transfer.tp.hub import RankHub
from pdserve.disagg.transfer.tp.links import HeadRange, decode_links, head_range
from pdserve.disagg.transfer.tp.messages import OpenReceiver, OpenSender, PeerDead, SendPages


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
