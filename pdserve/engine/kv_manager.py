"""Page bookkeeping for requests: allocation with eviction, prefix reuse, release, integrity.

Every page is in exactly one of three places, which `check_integrity` asserts:

    free (allocator)  +  cached (prefix-cache nodes)  +  private (request tables)  ==  capacity

A request's table is `pages[:tree_pages]` (cache nodes, locked through `tree_node`) followed
by private pages it allocated. Release either hands the computed full pages to the cache
(finish, abort, preemption) or frees them (failed transfers: their bytes cannot be trusted).
KV tiers plug in under the cache (`tier`, engine/prefix_cache.py's KVTier): a match may bring
pages back from a lower tier, an eviction may demote them; NoTier (the default) holds none.
"""

from __future__ import annotations

from typing import Iterable

from pdserve.engine.kv_cache import PageAllocator, pages_needed
from pdserve.engine.prefix_cache import KVTier, PrefixCache
from pdserve.engine.request import Request


class KVManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool, tier: KVTier | None = None) -> None:
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = PrefixCache(self.allocator, page_size, enabled=enable_prefix_cache, tier=tier)

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def available(self) -> int:
        """Pages obtainable now: free plus evictable cached pages."""
        return self.allocator.num_free + self.cache.evictable_pages()

    def attach_prefix(self, req: Request) -> None:
        """Reuse the longest cached prefix (leaving at least one token to compute, and the prompt
        rows a scored prompt still needs) and lock it."""
        req.num_computed = self.lock_prefix(req, req.prefix_limit)

    def lock_prefix(self, req: Request, num_tokens: int) -> int:
        """Make the longest cached full-page prefix of `req.tokens[:num_tokens]` the head of the
        request's (empty) table and lock it; returns the tokens it covers. `release` undoes it."""
        pages, node = self.cache.match(req.tokens[:num_tokens])
        self.cache.lock(node)
        req.pages, req.tree_pages, req.tree_node = list(pages), len(pages), node
        return len(pages) * self.page_size

    def ensure_pages(self, req: Request, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens`; evict cached pages if needed."""
        need = pages_needed(num_tokens, self.page_size) - len(req.pages)
        if need <= 0:
            return True
        short = need - self.allocator.num_free
        if short > 0 and self.cache.evict(short) < short:
            return False
        req.pages.extend(self.allocator.alloc(need))
        return True

    def trim(self, req: Request, num_tokens: int) -> None:
        """Free the request's private pages past those holding `num_tokens` (rejected drafts'
        pages after a speculative step); cached pages stay."""
        keep = max(pages_needed(num_tokens, self.page_size), req.tree_pages)
        if keep < len(req.pages):
            self.allocator.free(req.pages[keep:])
            del req.pages[keep:]

    def cache_prefix(self, req: Request) -> None:
        """Insert the request's computed full pages into the cache while it keeps running."""
        if not self.cache.enabled:
            return
        n_full = req.num_computed // self.page_size
        if n_full <= req.tree_pages:
            return
        table, node = self.cache.insert(req.tokens[: n_full * self.page_size], req.pages[:n_full])
        req.pages[:n_full] = table
        self.cache.lock(node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.tree_pages, req.tree_node = n_full, node

    def share_prefix(self, req: Request) -> None:
        """Like `cache_prefix`, but the request's table never changes: pages it may have handed
        to a KV sender keep their ids. Insertion stops at the first page the tree already holds
        under another id (it stays private and is deduplicated at release)."""
        if not self.cache.enabled:
            return
        n_full = min(req.num_computed // self.page_size, len(req.pages))
        if n_full <= req.tree_pages:
            return
        count, node = self.cache.insert_own(req.tokens[: n_full * self.page_size], req.pages[:n_full])
        if count <= req.tree_pages:
            return
        self.cache.lock(node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.tree_pages, req.tree_node = count, node

    def release(self, req: Request, keep_in_cache: bool = True) -> None:
        """Give back every page the request holds; computed full pages go to the cache."""
        start = req.tree_pages
        if keep_in_cache and self.cache.enabled:
            n_full = min(req.num_computed // self.page_size, len(req.pages))
            self.cache.insert(req.tokens[: n_full * self.page_size], req.pages[:n_full])
            start = max(n_full, req.tree_pages)
        self.allocator.free(req.pages[start:])
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.pages, req.tree_pages, req.tree_node = [], 0, None

    def check_integrity(self, live: Iterable[Request]) -> None:
        private = sum(len(r.pages) - r.tree_pages for r in live)
        total = self.allocator.num_free + self.cache.num_pages + private
        assert total == self.capacity, (
            f"KV pages leaked: free {self.allocator.num_free} + cached {self.cache.num_pages} "
            f"+ in use {private} = {total} != {self.capacity}")
