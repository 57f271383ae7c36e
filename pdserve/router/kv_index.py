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
"""

from __future__ import annotations

from pdserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, KVSnapshot, chain_hashes


class WorkerIndex:
    __slots__ = ("block_size", "hashes", "resyncs", "seq", "synced", "ts")

    def __init__(self) -> None:
        self.hashes: set[int] = set()
        self.seq = 0
        self.block_size = 0
        self.synced = False
        self.resyncs = 0
        self.ts = 0.0  # publisher time of the snapshot or the last batch applied

    def load(self, snap: KVSnapshot) -> None:
        self.hashes = {b.block_hash for b in snap.blocks}
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
                self.hashes.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                self.hashes.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.hashes.clear()
        self.seq = seq
        self.ts = batch.ts
        return True

    def prefix_pages(self, chain: list[int]) -> int:
        n = 0
        for h in chain:
            if h not in self.hashes:
                break
            n += 1
        return n


class KVIndex:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerIndex] = {}

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

    def hits(self, urls: list[str], token_ids: list[int]) -> dict[str, int]:
        """Cached prefix in tokens (page-aligned) per indexed worker among `urls`."""
        out: dict[str, int] = {}
        chains: dict[int, list[int]] = {}
        for u in urls:
            w = self.get(u)
            if w is None or not w.block_size:
                continue
            chain = chains.get(w.block_size)
            if chain is None:
                chain = chains[w.block_size] = chain_hashes(token_ids, w.block_size)
            out[u] = w.prefix_pages(chain) * w.block_size
        return out

    def remove(self, url: str) -> None:
        self.workers.pop(url, None)

    def describe(self) -> dict[str, dict[str, object]]:
        """`GET /kv_index` (debugging and tests): per worker its seq, sync state and hashes."""
        return {u: {"seq": w.seq, "synced": w.synced, "block_size": w.block_size, "resyncs": w.resyncs,
                    "num_blocks": len(w.hashes), "block_hashes": sorted(w.hashes)}
                for u, w in self.workers.items()}
