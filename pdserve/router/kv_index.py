"""The router's exact view of each worker's prefix cache, kept from the workers' KV events.

A worker's radix cache is a prefix-closed set of pages, each named by its chained page hash
(pdserve/kv_events), so the index per worker is a set of hashes plus the last applied batch
seq. Lifecycle of a `WorkerIndex` (driven by router/kv_sync.py):
  - `load(snapshot)` replaces it with `GET /kv_events/snapshot` (at connect, and on a gap);
  - `apply(seq, batch)` applies one published batch: a seq <= the current one is old news
    (dropped) unless it is older yet published later (the server restarted), seq + 1 is
    applied, anything further means lost batches: a restart or a gap answers False and the
    subscriber resyncs (the index is marked unsynced until then);
  - `prefix_pages(chain)` counts the leading hashes of a prompt's chain the worker holds: its
    cached prefix in pages (exact while synced).
`KVIndex` maps worker url -> WorkerIndex; a worker with none (or unsynced) is "not indexed" and
the policies fall back to their approximate tree for it.

Tiers (KV events' `medium`, engine/kv_tiers): a worker's own pages are on its device (`hashes`)
or in its host tier (`host`), both its cached prefix; pages it wrote to shared storage go to the
`StoreIndex` of the store it advertises (`/server_info` `hicache_storage`), which every worker of
that store can fetch from. A prompt's hit on a worker is the leading run of its chain that the
worker holds or can fetch; a fetchable page counts STORE_WEIGHT of a held one (loading beats
computing, holding beats loading). Nothing tells when a store evicts a page: a StoreIndex keeps
the most recent STORE_CAP pages it heard of, for at most STORE_TTL_S (a stale entry costs a
miss: the page is computed).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from pdserve.kv_events import (
    MEDIUM_DEVICE,
    MEDIUM_HOST,
    STORAGE_MEDIA,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
    chain_hashes,
)

STORE_WEIGHT = 0.75
STORE_CAP = 1 << 20
STORE_TTL_S = 3600.0


class StoreIndex:
    """Pages some worker wrote to one shared store (hash -> when last heard of), LRU-capped."""

    def __init__(self, cap: int = STORE_CAP, ttl_s: float = STORE_TTL_S) -> None:
        self.cap, self.ttl_s = cap, ttl_s
        self.pages: OrderedDict[int, float] = OrderedDict()

    def add(self, hashes: list[int]) -> None:
        now = time.monotonic()
        for h in hashes:
            self.pages[h] = now
            self.pages.move_to_end(h)
        while len(self.pages) > self.cap:
            self.pages.popitem(last=False)

    def __contains__(self, h: int) -> bool:
        t = self.pages.get(h)
        return t is not None and time.monotonic() - t < self.ttl_s


class WorkerIndex:
    __slots__ = ("block_size", "hashes", "host", "resyncs", "seq", "store", "synced", "ts")

    def __init__(self, store: StoreIndex | None = None) -> None:
        self.hashes: set[int] = set()  # on its device
        self.host: set[int] = set()  # in its host tier
        self.store = store  # the shared store it advertises (None: none)
        self.seq = 0
        self.block_size = 0
        self.synced = False
        self.resyncs = 0
        self.ts = 0.0  # publisher time of the snapshot or the last batch applied

    def _tier(self, medium: str | None) -> set[int] | None:
        """The set a BlockStored's medium fills (None: a store page, or a store this worker lacks)."""
        if medium is None or medium == MEDIUM_DEVICE:
            return self.hashes
        return self.host if medium == MEDIUM_HOST else None

    def _stored(self, hashes: list[int], medium: str | None) -> None:
        tier = self._tier(medium)
        if tier is not None:
            tier.update(hashes)
        elif medium in STORAGE_MEDIA and self.store is not None:
            self.store.add(hashes)

    def load(self, snap: KVSnapshot) -> None:
        self.hashes, self.host = set(), set()
        for b in snap.blocks:
            self._stored([b.block_hash], b.medium)
        self.seq = snap.seq
        self.block_size = snap.block_size
        self.ts = snap.ts
        self.synced = True

    def apply(self, seq: int, batch: KVEventBatch) -> bool:
        if not self.synced:
            return False
        if seq < self.seq and batch.ts > self.ts:  # published after what we hold, seq began again
            self.synced = False
            return False
        if seq <= self.seq:
            return True  # already in the snapshot (or a heartbeat)
        if seq != self.seq + 1:
            self.synced = False
            return False
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._stored(ev.block_hashes, ev.medium)
            elif isinstance(ev, BlockRemoved):
                if ev.medium is None or ev.medium == MEDIUM_DEVICE:
                    self.hashes.difference_update(ev.block_hashes)
                if ev.medium is None or ev.medium == MEDIUM_HOST:
                    self.host.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.hashes.clear()
                self.host.clear()
        self.seq = seq
        self.ts = batch.ts
        return True

    def prefix_pages(self, chain: list[int], store_weight: float = STORE_WEIGHT) -> float:
        """The leading pages of `chain` this worker holds (1 each) or can fetch from its store
        (`store_weight` each)."""
        n = 0.0
        store = self.store
        for h in chain:
            if h in self.hashes or h in self.host:
                n += 1
            elif store is not None and h in store:
                n += store_weight
            else:
                break
        return n


class KVIndex:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerIndex] = {}
        self.stores: dict[str, StoreIndex] = {}  # hicache_storage id -> what workers wrote there

    def follow(self, url: str, store_id: str | None) -> WorkerIndex:
        """A fresh index for worker `url`, tied to the store it advertises."""
        store = self.stores.setdefault(store_id, StoreIndex()) if store_id else None
        w = self.workers[url] = WorkerIndex(store)
        return w

    def get(self, url: str) -> WorkerIndex | None:
        w = self.workers.get(url)
        return w if w is not None and w.synced else None

    def indexed(self, urls: list[str]) -> bool:
        return any(self.get(u) is not None for u in urls)

    def block_size(self, urls: list[str]) -> int:
        for u in urls:
            w = self.get(u)
            if w is not None and w.block_size:
                return w.block_size
        return 0

    def hits(self, urls: list[str], token_ids: list[int], store_weight: float = STORE_WEIGHT) -> dict[str, int]:
        """Cached prefix in tokens (page-aligned; a page only in the worker's store counts
        `store_weight` of one) per indexed worker among `urls`."""
        out: dict[str, int] = {}
        chains: dict[int, list[int]] = {}
        for u in urls:
            w = self.get(u)
            if w is None or not w.block_size:
                continue
            chain = chains.get(w.block_size)
            if chain is None:
                chain = chains[w.block_size] = chain_hashes(token_ids, w.block_size)
            out[u] = int(w.prefix_pages(chain, store_weight) * w.block_size)
        return out

    def remove(self, url: str) -> None:
        self.workers.pop(url, None)

    def describe(self) -> dict[str, dict[str, object]]:
        """`GET /kv_index` (debugging and tests): per worker its seq, sync state and hashes."""
        return {u: {"seq": w.seq, "synced": w.synced, "block_size": w.block_size, "resyncs": w.resyncs,
                    "num_blocks": len(w.hashes), "block_hashes": sorted(w.hashes), "host_hashes": sorted(w.host),
                    "store_blocks": len(w.store.pages) if w.store is not None else None}
                for u, w in self.workers.items()}
