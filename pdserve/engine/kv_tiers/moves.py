"""Moving pages between tiers for the radix cache: the KVTier seam, loads and fetches, applying copies.

`TierMoves` is the tiered cache's KVTier (engine/prefix_cache.py): `promote` sees each device
match (it counts hits: write_through_selective backs hot pages up; loads from lower tiers were
started before admission, by the KV manager's `prepare`), `demote` copies evicted pages into
their host slots (the one synchronous copy). KV events name the tier each page enters.

Lifecycle of a copy (tiers.py runs it; the cache reserves and applies it on the engine thread):
  start_load   host-only nodes continuing a device path: their path is locked, fresh device
               pages reserved (evicting if needed), the copy thread fills them
  start_fetch  pages beyond the tree: a lookup (storage thread) asks how many the store holds,
               `_apply_lookup` reserves host slots for those and starts the fetch
  apply_*      at the next poll: a backup gives its nodes their host copy (and goes on to storage
               under write-through), a load its nodes their device pages (a page a request
               computed meanwhile wins: the loaded one is freed), a fetch adds host-only nodes
               under the anchor, a store marks its nodes stored; locks are released, and with
               `keep` the arrived path is pinned for the waiting request (manager.py unpins it)
"""

from __future__ import annotations

from pdserve.engine.kv_tiers.radix import TieredPrefixCache
from pdserve.engine.kv_tiers.tiers import Copy
from pdserve.engine.prefix_cache import NO_PAGE, NO_SLOT, Node
from pdserve.kv_events import MEDIUM_DEVICE, MEDIUM_HOST, page_hash

class TierMoves:
    def __init__(self, cache: TieredPrefixCache) -> None:
        self.cache = cache
        self.tiers = cache.tiers
        cache.tier = self  # the cache's KVTier: its matches and evictions come here

    # -- the KVTier seam ---------------------------------------------------------------------
    def promote(self, tokens: list[int], pages: list[int], node: Node) -> tuple[list[int], Node]:
        """A device match ending at `node`: every node on its path was hit once more."""
        hot = []
        n: Node | None = node
        while n is not None and n is not self.cache.root:
            n.hits += 1
            if self.cache.policy == "write_through_selective" and n.hits >= self.tiers.cfg.hot_hits:
                hot.append(n)
            n = n.parent
        if hot:
            self.cache._backup(hot[::-1])
        return pages, node

    def demote(self, nodes: list[Node]) -> None:
        """Eviction frees these nodes' device pages: copy them into the host slots they were given."""
        self.tiers.copy_now([n.page for n in nodes], [n.host for n in nodes])
        self.tiers.counters.demoted += len(nodes)
        self.cache.tell_stored(nodes, MEDIUM_HOST)

    def start_load(self, low: list[Node], keep: bool = False) -> Copy | None:
        """Copy host-only nodes `low` (continuing a device path) into fresh device pages; with
        `keep`, the loaded path is pinned for the caller at apply (`Copy.held`)."""
        self.cache.lock(low[-1])  # the whole path: nothing it reads or extends can be evicted meanwhile
        short = len(low) - self.cache.allocator.num_free
        if short > 0:
            self.cache.evict(short)
        n = min(len(low), self.cache.allocator.num_free)
        self.cache.unlock(low[-1])
        if n == 0:
            return None
        low = low[:n]
        self.cache.lock(low[-1])
        for node in low:
            node.copying += 1
        c = Copy("load", nodes=low, pages=self.cache.allocator.alloc(n), slots=[x.host for x in low], anchor=low[-1],
                 keep=keep)
        self.tiers.submit(c)
        return c

    def start_fetch(self, anchor: Node, tokens: list[int], first: int, count: int, keep: bool = False) -> Copy:
        """Ask storage for pages first .. first+count-1 of `tokens` (continuing `anchor`); the
        pages it holds are then read into host slots (`_apply_lookup` starts that fetch); with
        `keep`, the fetched path is pinned for the caller at apply (`Copy.held`)."""
        ps = self.cache.page_size
        keys = [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(first, first + count)]
        hashes, h = [], anchor.hash
        for key in keys:
            h = page_hash(h, key)
            hashes.append(h)
        self.cache.lock(anchor)
        c = Copy("lookup", hashes=hashes, keys=keys, anchor=anchor, keep=keep)
        self.tiers.submit(c)
        return c

    def apply_finished(self) -> list[Copy]:
        """Apply the copies that finished since the last call (the engine thread's poll)."""
        done = self.tiers.finished()
        for c in done:
            getattr(self, f"_apply_{c.kind}")(c)
            c.applied = True
        return done

    def _apply_backup(self, c: Copy) -> None:
        for n, ok in zip(c.nodes, c.ok):
            n.copying -= 1
            if not ok:
                self.tiers.host.allocator.free([n.host])
                n.host = NO_SLOT
                self.cache.num_host -= 1
        self.tiers.counters.backed_up += sum(c.ok)
        done = [n for n, ok in zip(c.nodes, c.ok) if ok]
        self.cache.tell_stored(done, MEDIUM_HOST)
        self.cache.store_pages([n for n in done if c.then_store or self.cache.writes_through(n)])

    def _apply_load(self, c: Copy) -> None:
        unused = []
        for n, page, ok in zip(c.nodes, c.pages, c.ok):
            n.copying -= 1
            if ok and n.page == NO_PAGE:
                n.page = page
                self.cache.num_pages += 1
            else:  # the copy failed, or a request computed the page meanwhile (adopted)
                unused.append(page)
        self.cache.allocator.free(unused)
        self.tiers.counters.loaded += len(c.pages) - len(unused)
        self.cache.tell_stored([n for n, ok in zip(c.nodes, c.ok) if ok and n.page != NO_PAGE], MEDIUM_DEVICE)
        assert c.anchor is not None
        if c.keep:
            self.cache.pin(c.anchor)
            c.held = c.anchor
        self.cache.unlock(c.anchor)

    def _apply_store(self, c: Copy) -> None:
        new = []
        for n, ok in zip(c.nodes, c.ok):
            n.storing -= 1
            if ok and not n.stored:
                n.stored = True
                new.append(n)
        self.tiers.counters.stored += sum(c.ok)
        if self.tiers.store is not None:
            self.cache.tell_stored(new, self.tiers.storage_medium)

    def _apply_lookup(self, c: Copy) -> None:
        assert c.anchor is not None
        n = next((i for i, ok in enumerate(c.ok) if not ok), len(c.ok))
        slots = self.cache.host_alloc(n) if n else []
        if not slots:
            self.cache.unlock(c.anchor)
            return
        k = len(slots)
        c.next = Copy("fetch", slots=slots, hashes=c.hashes[:k], keys=c.keys[:k], anchor=c.anchor, keep=c.keep)
        self.tiers.submit(c.next)

    def _apply_fetch(self, c: Copy) -> None:
        assert c.anchor is not None
        parent, new, unused, filled = c.anchor, [], [], []
        k = next((i for i, ok in enumerate(c.ok) if not ok), len(c.ok))
        for key, slot, h in zip(c.keys[:k], c.slots[:k], c.hashes[:k]):
            child = parent.children.get(key)
            if child is None:
                child = Node(key=key, page=NO_PAGE, parent=parent, depth=parent.depth + 1, hash=h, host=slot,
                             stored=True)
                parent.children[key] = child
                self.cache.num_host += 1
                new.append(child)
            elif child.host == NO_SLOT and not child.copying:
                child.host, child.stored = slot, True
                self.cache.num_host += 1
                filled.append(child)
            else:
                unused.append(slot)
            self.cache.touch(child)
            parent = child
        self.tiers.host.allocator.free(unused + c.slots[k:])
        self.tiers.counters.fetched += k
        if c.keep and k:
            self.cache.pin(parent)
            c.held = parent
        self.cache.unlock(c.anchor)
        self.cache.tell_stored(filled + new, MEDIUM_HOST)  # (new nodes: one chain below any reused one)
        if self.tiers.store is not None:  # ... and they are in the store, for whoever did not know
            self.cache.tell_stored(filled + new, self.tiers.storage_medium)
