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
`poll` (once per schedule) applies finished copies to the tree. Every page and slot is counted:

    device: free + cached on device + private (requests) + reserved by loads in flight == capacity
    host:   free + held by nodes + reserved by fetches in flight                      == host slots
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Iterable

from pdserve.engine.kv_manager import KVManager
from pdserve.engine.kv_tiers.moves import TierMoves
from pdserve.engine.kv_tiers.radix import TieredPrefixCache
from pdserve.engine.kv_tiers.tiers import Copy, KVTiers
from pdserve.engine.prefix_cache import Node
from pdserve.engine.request import Request


@dataclass(eq=False)
class Staging:
    copy: Copy | None = None  # the load / fetch this request waits for
    fetched: bool = False  # storage was asked for its prefix (once per request)
    since: float = 0.0  # when the current copy started
    hold: Node | None = None  # pinned: what its copies brought in, until it is admitted or released


class TieredKVManager(KVManager):
    def __init__(self, num_pages: int, page_size: int, tiers: KVTiers) -> None:
        super().__init__(num_pages, page_size, enable_prefix_cache=True)
        self.tiers = tiers
        self.cache: TieredPrefixCache = TieredPrefixCache(self.allocator, page_size, tiers)
        self.moves = TierMoves(self.cache)
        self._staged: weakref.WeakKeyDictionary[Request, Staging] = weakref.WeakKeyDictionary()

    def poll(self) -> None:
        self.moves.apply_finished()

    def prepare(self, req: Request) -> bool:
        st = self._staged.setdefault(req, Staging())
        if st.copy is not None:
            st.copy = st.copy.last()  # a lookup that found pages went on to fetch them
            if not st.copy.applied:
                return self._may_go(st)
            if st.copy.held is not None:
                self._hold(st, st.copy.held)
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

    def _hold(self, st: Staging, node: Node | None) -> None:
        """Take over a pin (`Copy.held`, pinned at apply) or let it go (node None)."""
        if st.hold is not None:
            self.cache.unpin(st.hold)
        st.hold = node

    def attach_prefix(self, req: Request) -> None:
        super().attach_prefix(req)  # the request's own lock now covers what it was holding
        st = self._staged.get(req)
        if st is not None:
            self._hold(st, None)

    def release(self, req: Request, keep_in_cache: bool = True) -> None:
        st = self._staged.get(req)
        if st is not None:
            if st.copy is not None:
                st.copy.last().keep = False  # a copy still moving unlocks its pages itself
            self._hold(st, None)
        super().release(req, keep_in_cache)

    def _may_go(self, st: Staging) -> bool:
        """May the request run while its copy is still moving?"""
        assert st.copy is not None
        if st.copy.kind == "load":
            return False
        policy = self.tiers.cfg.prefetch_policy
        return policy == "best_effort" or (
            policy == "timeout" and time.monotonic() - st.since > self.tiers.cfg.prefetch_timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every copy in flight and apply it (tests, flush_cache, shutdown)."""
        while True:
            self.tiers.wait_idle(timeout_s)
            self.poll()  # applying a copy may start the next one (backup -> store, lookup -> fetch)
            if not self.tiers.pending:
                return

    def close(self) -> None:
        self.tiers.close()

    def check_integrity(self, live: Iterable[Request]) -> None:
        private = sum(len(r.pages) - r.tree_pages for r in live)
        loading = self.tiers.pages_in_flight
        total = self.allocator.num_free + self.cache.num_pages + private + loading
        assert total == self.capacity, (
            f"KV pages leaked: free {self.allocator.num_free} + cached {self.cache.num_pages} "
            f"+ in use {private} + loading {loading} = {total} != {self.capacity}")
        self.cache.check()
