"""The engine's side of KV events: what the radix cache reports, gathered into event lists.

Lifecycle: the engine process (engine/process.py, `--kv-events-config`) attaches one
`KVEventLog` to the prefix cache at start (`attach`); from then on each insert, eviction and
flush appends an event (pdserve/kv_events: BlockStored / BlockRemoved / AllBlocksCleared);
after every engine step or control message the engine process `take()`s them and publishes
them as one batch (engine/kv_publisher.py). With KV tiers each event names its tier (`medium`).
`snapshot(seq)` lists every cached page with its parent's hash (once per tier holding it),
current as of batch `seq` (events not yet taken must be published first).
"""

from __future__ import annotations

import time

from pdserve.engine.prefix_cache import Node, PrefixCache
from pdserve.kv_events import MEDIUM_DEVICE, AllBlocksCleared, BlockRemoved, BlockStored, KVBlock, KVEvent, KVSnapshot


class KVEventLog:
    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        self.page_size = cache.page_size
        self.events: list[KVEvent] = []

    def attach(self) -> None:
        self.cache.attach_listener(self)

    # -- CacheListener ----------------------------------------------------------------------
    def stored(self, parent_hash: int, nodes: list[Node], medium: str = MEDIUM_DEVICE) -> None:
        tokens: list[int] = []
        for n in nodes:
            tokens.extend(n.key)
        self.events.append(BlockStored(block_hashes=[n.hash for n in nodes],
                                       parent_block_hash=parent_hash or None, token_ids=tokens,
                                       block_size=self.page_size,
                                       medium=None if medium == MEDIUM_DEVICE else medium))

    def removed(self, nodes: list[Node], medium: str | None = None) -> None:
        self.events.append(BlockRemoved(block_hashes=[n.hash for n in nodes], medium=medium))

    def cleared(self) -> None:
        self.events.append(AllBlocksCleared())

    # -- the engine process -----------------------------------------------------------------
    def take(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out

    def snapshot(self, seq: int) -> KVSnapshot:
        """Every cached page, once per tier that holds it (the cache's `media`)."""
        blocks = [KVBlock(n.hash, n.parent.hash if n.parent is not None else 0, list(n.key),
                          None if medium == MEDIUM_DEVICE else medium)
                  for n in self.cache.nodes() for medium in self.cache.media(n)]
        return KVSnapshot(seq=seq, block_size=self.page_size, blocks=blocks, ts=time.time())
