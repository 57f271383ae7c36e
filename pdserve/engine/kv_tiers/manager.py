"""The KV manager with tiers: a waiting request's prefix is brought to the device before it runs.

Lifecycle of a waiting request against the tiers (`prepare`, called by the scheduler each time
it considers the request; False = skip it this step, others go on):
  1. match every tier: device nodes, then the host-only continuation;
  2. a host continuation → load it into device pages (copy thread); the request waits for it
     (a memcpy per page, off the step);
  3. else, with storage, pages beyond the tree → fetch them (storage thread) into host slots,
     once per request; the request waits per the prefetch policy (wait_complete: until done;
     timeout: at most prefetch_timeout_s; best_effort: not at all, later requests benefit);
     the fetched pages then go through 2;
  4. ready: `attach_prefix` locks the device prefix, which now covers what every tier held.
What a request's copies brought in stays pinned for it (`Staging.hold`) until it is admitted
(`attach_prefix` locks its own prefix) or released: eviction takes pinned pages last, so other
requests' eviction does not undo the copy, yet a pin never reserves pages the running batch needs.
`poll` (once per schedule, and by the engine process while idle with copies pending) applies
finished copies to the tree. Hits are counted per tier the prefix came from at the request's
first admission, added to `TierCounters.hit_tokens` when it is released. A PD decode
(`TierConfig.write_finished`) writes every finished request's pages, prompt and reply, to
storage whatever the write policy, and under write_through each page as it completes
(`pages_completed`, called by its stage after every forward), so another instance can continue
a stream or a recomputed request from the store.
Every page and slot is counted:

    device: free + cached on device + private (requests) + reserved by loads in flight == capacity
    host:   free + held by nodes + reserved by fetches in flight                      == host slots
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Iterable

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVPool, Pool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.kv_tiers.host_pool import HostPool
from pdserve.engine.kv_tiers.moves import TierMoves
from pdserve.engine.kv_tiers.radix import TieredPrefixCache
from pdserve.engine.kv_tiers.tiers import Copy, KVTiers, TierConfig, namespace_for
from pdserve.engine.messages import TierLoad
from pdserve.engine.prefix_cache import Node
from pdserve.engine.request import Request


@dataclass(eq=False)
class Staging:
    copy: Copy | None = None  # the load / fetch this request waits for
    fetched: bool = False  # storage was asked for its prefix (once per request)
    since: float = 0.0  # when the current copy started
    hold: Node | None = None  # pinned: what its copies brought in, until it is admitted or released
    loaded: int = 0  # pages its loads brought to the device
    from_storage: int = 0  # pages its fetches brought from storage (then loaded)
    split: tuple[int, int, int] = (0, 0, 0)  # its hit at its first admission: device, host, storage pages
    counted: bool = False  # split added to the tier counters (once, when it is released)


class TieredKVManager(KVManager):
    def __init__(self, num_pages: int, page_size: int, tiers: KVTiers) -> None:
        super().__init__(num_pages, page_size, enable_prefix_cache=True)
        self.tiers = tiers
        self.cache: TieredPrefixCache = TieredPrefixCache(self.allocator, page_size, tiers)
        self.moves = TierMoves(self.cache)  # the cache's KVTier
        self._staged: weakref.WeakKeyDictionary[Request, Staging] = weakref.WeakKeyDictionary()
        self.write_finished = tiers.cfg.write_finished  # a PD decode's write-back (set_role changes it)

    @classmethod
    def build(cls, config: EngineConfig, pool: Pool, model_name: str, decode: bool = False) -> "TieredKVManager":
        """The tiers `config.hicache` asks for over `pool` (engine/build.py): the host tier sized
        by --hicache-size or --hicache-ratio; a PD decode writes finished requests back."""
        h = config.hicache
        h.check(config.enable_prefix_cache, config.parallel)
        if not isinstance(pool, KVPool):
            raise ValueError("--enable-hierarchical-cache with a latent (MLA) KV pool is not supported yet")
        ps = pool.page_size
        host = HostPool.slots_for_bytes(pool.k, ps, int(h.size_gb * 2**30)) if h.size_gb > 0 \
            else max(1, int(h.ratio * pool.num_pages))
        cfg = TierConfig.from_hicache(h, host, write_finished=decode)
        return cls(pool.num_pages, ps, KVTiers(cfg, pool.k, pool.v, ps, namespace_for(model_name, pool.k, ps)))

    def poll(self) -> None:
        self.moves.apply_finished()

    @property
    def copies_pending(self) -> bool:
        return self.tiers.pending > 0

    def prepare(self, req: Request) -> bool:
        st = self._staged.setdefault(req, Staging())
        if st.copy is not None:
            st.copy = st.copy.last()  # a lookup that found pages went on to fetch them
            if not st.copy.applied:
                return self._may_go(st)
            self._arrived(st, st.copy)
        st.copy = None
        tokens = req.tokens[:req.prefix_limit]
        dev, low = self.cache.match_tiers(tokens)
        if low:
            st.copy, st.since = self.moves.start_load(low, keep=True), time.monotonic()
            return st.copy is None
        covered, full = len(dev), len(tokens) // self.page_size
        if self.tiers.store is not None and not st.fetched and covered < full:
            st.fetched = True
            anchor = dev[-1] if dev else self.cache.root
            st.copy = self.moves.start_fetch(anchor, tokens, covered, full - covered, keep=True)
            st.since = time.monotonic()
            return self._may_go(st)
        return True

    def _arrived(self, st: Staging, c: Copy) -> None:
        """A copy the request waited for was applied: pin what it brought, count it."""
        if c.held is not None:
            self._hold(st, c.held)
        if c.kind == "load":
            st.loaded += sum(c.ok)
        elif c.kind == "fetch":
            st.from_storage += next((i for i, ok in enumerate(c.ok) if not ok), len(c.ok))

    def _hold(self, st: Staging, node: Node | None) -> None:
        """Take over a pin (`Copy.held`, pinned at apply) or let it go (node None)."""
        if st.hold is not None:
            self.cache.unpin(st.hold)
        st.hold = node

    def attach_prefix(self, req: Request) -> None:
        super().attach_prefix(req)  # the request's own lock now covers what it was holding
        st = self._staged.get(req)
        if st is None:
            return
        self._hold(st, None)
        if not req.admitted:  # (the scheduler may still give up on it this step: counted at release)
            hit = req.num_computed // self.page_size
            loaded = min(st.loaded, hit)
            stored = min(st.from_storage, loaded)
            st.split = (hit - loaded, loaded - stored, stored)

    def release(self, req: Request, keep_in_cache: bool = True) -> None:
        st = self._staged.get(req)
        if st is not None:
            if st.copy is not None:
                st.copy.last().keep = False  # a copy still moving unlocks its pages itself
            self._hold(st, None)
            if req.admitted and not st.counted:  # its hit per tier, once
                st.counted = True
                for tier, pages in zip(("device", "host", "storage"), st.split):
                    self.tiers.counters.hit_tokens[tier] += pages * self.page_size
        done = req.tokens[:min(req.num_computed // self.page_size, len(req.pages)) * self.page_size]
        super().release(req, keep_in_cache)
        if keep_in_cache and self.write_finished and self.tiers.store is not None:
            self.cache._backup(self.cache.path(done), store=True)  # a decode writes back what it served

    def pages_completed(self, req: Request) -> None:
        if self.write_finished and self.tiers.cfg.write_policy == "write_through" and self.tiers.store:
            self.cache_prefix(req)  # full pages join the tree: write-through takes them to storage

    def _may_go(self, st: Staging) -> bool:
        """May the request run while its copy is still moving?"""
        assert st.copy is not None
        if st.copy.kind == "load":
            return False
        policy = self.tiers.cfg.prefetch_policy
        return policy == "best_effort" or (
            policy == "timeout" and time.monotonic() - st.since > self.tiers.cfg.prefetch_timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every copy in flight and apply it (tests, flush_cache, warm-up, shutdown)."""
        while True:
            self.tiers.wait_idle(timeout_s)
            self.poll()  # applying a copy may start the next one (backup -> store, lookup -> fetch)
            if not self.tiers.pending:
                return

    def set_storage(self, backend: str | None, extra: str | None = None) -> None:
        """SGLang's runtime attach / detach of the storage backend: copies in flight finish first;
        what the tree knew to be stored is forgotten (another store holds other pages)."""
        self.flush()
        self.tiers.detach_storage()
        for n in self.cache.nodes():
            n.stored = False
        if backend is not None:
            self.tiers.attach_storage(backend, extra)

    def set_role(self, decode: bool) -> None:
        self.write_finished = decode

    def close(self) -> None:
        self.tiers.close()

    def tier_load(self) -> TierLoad:
        t, c = self.tiers, self.tiers.counters
        sc = t.storage_counters
        return TierLoad(
            host_pages=t.host.num_slots, host_used=self.cache.num_host + t.slots_in_flight,
            page_bytes=t.host.slot_bytes, storage_backend=t.store.backend.name if t.store is not None else None,
            storage_up=not sc.down, hit_tokens=dict(c.hit_tokens), host_pages_read=c.loaded,
            host_pages_written=c.backed_up + c.demoted, storage_pages_read=sc.pages_read,
            storage_bytes_read=sc.bytes_read, storage_pages_written=sc.pages_written,
            storage_bytes_written=sc.bytes_written, storage_write_failures=sc.write_failures + c.writes_skipped,
            storage_misses=sc.misses, storage_bad_pages=sum(sc.bad_pages.values()), storage_outages=sc.outages,
            loads=c.loads, load_seconds=c.load_s, prefetches=c.prefetches, prefetch_seconds=c.fetch_s)

    def check_integrity(self, live: Iterable[Request]) -> None:
        private = sum(len(r.pages) - r.tree_pages for r in live)
        loading = self.tiers.pages_in_flight
        total = self.allocator.num_free + self.cache.num_pages + private + loading
        assert total == self.capacity, (
            f"KV pages leaked: free {self.allocator.num_free} + cached {self.cache.num_pages} "
            f"+ in use {private} + loading {loading} = {total} != {self.capacity}")
        self.cache.check()
