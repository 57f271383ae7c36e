"""Radix prefix cache over KV pages, with reference counts and LRU eviction.

The tree's radix is one page: each node holds one full page of `page_size` token ids (its
key) and the KV page id that stores them. A path from the root spells a token prefix.

    root ─ [t0..t15]:p7 ─ [t16..t31]:p9 ─ [t32..t47]:p2     request A's first 3 pages
                        └ [u16..u31]:p4                        request B diverged at page 1

Lifecycle of a request against the cache:
  match   → longest cached page prefix; the request locks its deepest node (ref +1 on the
            whole path) so nothing it reads can be evicted.
  insert  → after prefill (still running) or at finish, its full pages join the tree; a
            page whose content the tree already holds is a duplicate and is freed, the
            request's table then points at the tree's page. The lock moves to the new node.
  unlock  → at finish/abort/preemption; unreferenced leaves become evictable (LRU first).
Only partial last pages and pages beyond the tree stay private to a request.

Lower tiers (host memory, shared storage: engine/kv_tiers, picked by engine/build.py): `tier` is
a KVTier. `match` offers it the device hit (a tier may extend it, or count it); `evict` hands it
pages before they are freed, so it may keep their bytes (demote). With tiers a node also says
which lower tiers hold its page (`host` slot, `stored`), and `page` may be NO_PAGE (not on the
device: demoted to host or read from storage, loaded back before use); a match stops there, and
an insert adopts a request's freshly computed page for such a node (`_adopt`). NoTier, the
default, holds nothing: every node is on the device.

Events: with a `listener` (engine/kv_event_log.py, for `--kv-events-config`), every node gets its
chained page hash (pdserve/kv_events) when created, and the listener hears each insert's new
chain of pages (`stored`), each eviction's pages (`removed`) and a flush (`cleared`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from typing import Protocol

from pdserve.engine.kv_cache import PageAllocator
from pdserve.kv_events import MEDIUM_DEVICE, NO_PARENT, page_hash


class CacheListener(Protocol):
    """Hears the cache's changes (medium: the tier, pdserve/kv_events; None in `removed`: every tier)."""

    def stored(self, parent_hash: int, nodes: list["Node"], medium: str = MEDIUM_DEVICE) -> None: ...

    def removed(self, nodes: list["Node"], medium: str | None = None) -> None: ...

    def cleared(self) -> None: ...


class KVTier(Protocol):
    """A KV tier below the device pool (engine/build.py picks it; NoTier: none)."""

    def promote(self, tokens: list[int], pages: list[int], node: "Node") -> tuple[list[int], "Node"]:
        """After a device match (`pages`, ending at `node`): bring back the following full pages of
        `tokens` this tier holds, and return the longer match (as it is when it holds none; a tier
        that loads off the engine step has started its loads before admission, KVManager.prepare,
        and returns the device match)."""
        ...

    def demote(self, nodes: list["Node"]) -> None:
        """Eviction is about to free these nodes' pages: keep their bytes (their hashes name them)."""
        ...


class NoTier:
    """No tier below the device: a match is what the device holds, an evicted page is gone."""

    def promote(self, tokens: list[int], pages: list[int], node: "Node") -> tuple[list[int], "Node"]:
        return pages, node

    def demote(self, nodes: list["Node"]) -> None:
        pass


NO_PAGE = -1  # Node.page of a node whose page is not on the device (KV tiers)
NO_SLOT = -1  # Node.host of a node with no host-tier copy


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]
    page: int
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    ref: int = 0
    last_access: int = 0
    depth: int = 0  # pages from the root
    hash: int = NO_PARENT  # chained page hash (kv_events), set while a listener is attached or tiers are on
    # KV tiers only (engine/kv_tiers): lower tiers holding the page, copies in flight, matches seen
    host: int = NO_SLOT  # host-tier slot with a copy of the page
    stored: bool = False  # written to (or read from) the storage tier
    copying: int = 0  # device <-> host copies of this page in flight: it stays in both places
    storing: int = 0  # storage writes reading its host slot in flight
    hits: int = 0  # times a match reached it (write_through_selective)


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, enabled: bool = True,
                 tier: KVTier | None = None) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self.tier: KVTier = tier or NoTier()
        self.root = Node(key=(), page=-1, parent=None, ref=1)
        self.num_pages = 0  # pages held by tree nodes
        self._tick = 0
        self.listener: CacheListener | None = None

    def _touch(self, node: Node) -> None:
        self._tick += 1
        node.last_access = self._tick

    def _keys(self, tokens: list[int], num_pages: int) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(num_pages)]

    def match(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Pages of the longest cached full-page prefix of `tokens`, and its deepest node."""
        node = self.root
        pages: list[int] = []
        if not self.enabled:
            return pages, node
        for key in self._keys(tokens, len(tokens) // self.page_size):
            child = node.children.get(key)
            if child is None or child.page == NO_PAGE:  # (KV tiers) not on the device: loaded before admission
                break
            node = child
            self._touch(node)
            pages.append(node.page)
        return self.tier.promote(tokens, pages, node)

    def lock(self, node: Node) -> None:
        while node is not None:
            node.ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.ref -= 1
            assert node.ref >= 0, "prefix cache ref count below zero"
            node = node.parent  # type: ignore[assignment]

    def insert(self, tokens: list[int], pages: list[int]) -> tuple[list[int], Node]:
        """Insert the full pages of `tokens` (stored in `pages`); return the page table to use
        for them (duplicates replaced by the tree's pages, which are freed) and the deepest node."""
        n = min(len(tokens) // self.page_size, len(pages))
        node, out, dup, new = self.root, [], [], []
        for i, key in enumerate(self._keys(tokens, n)):
            child = node.children.get(key)
            if child is None:
                child = self._new_node(key, pages[i], node, new)
            elif child.page == NO_PAGE:
                self._adopt(child, pages[i])
            elif child.page != pages[i]:
                dup.append(pages[i])
            node = child
            self._touch(node)
            out.append(node.page)
        if dup:
            self.allocator.free(dup)
        self._report_stored(new)
        return out, node

    def insert_own(self, tokens: list[int], pages: list[int]) -> tuple[int, Node]:
        """Insert the leading full pages of `tokens` that the tree holds under no other page id,
        keeping `pages` as they are; returns how many of them now belong to the tree and the
        deepest such node (`insert` instead frees duplicates and swaps in the tree's pages)."""
        n = min(len(tokens) // self.page_size, len(pages))
        node, count, new = self.root, 0, []
        for i, key in enumerate(self._keys(tokens, n)):
            child = node.children.get(key)
            if child is None:
                child = self._new_node(key, pages[i], node, new)
            elif child.page == NO_PAGE:
                self._adopt(child, pages[i])
            elif child.page != pages[i]:
                break
            node = child
            self._touch(node)
            count += 1
        self._report_stored(new)
        return count, node

    def _new_node(self, key: tuple[int, ...], page: int, parent: Node, new: list[Node]) -> Node:
        child = Node(key=key, page=page, parent=parent, depth=parent.depth + 1)
        if self.listener is not None:
            child.hash = page_hash(parent.hash, key)
            new.append(child)
        parent.children[key] = child
        self.num_pages += 1
        return child

    def _adopt(self, node: Node, page: int) -> None:
        """A node whose page is in a lower tier only takes the request's freshly computed page."""
        node.page = page
        self.num_pages += 1

    def _report_stored(self, new: list[Node]) -> None:
        """New nodes of one insert form one chain (once a page is missing, all below are new)."""
        if new and self.listener is not None:
            parent = new[0].parent
            assert parent is not None
            self.listener.stored(parent.hash, new)

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages from unreferenced leaves, least recently used first."""
        heap = [(n.last_access, id(n), n) for n in self.nodes() if not n.children and n.ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        gone: list[Node] = []
        while heap and len(freed) < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.num_pages -= 1
            freed.append(node.page)
            gone.append(node)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if freed:
            self.tier.demote(gone)
            self.allocator.free(freed)
            if self.listener is not None:
                self.listener.removed(gone)
        return len(freed)

    def evictable_pages(self) -> int:
        return sum(1 for n in self.nodes() if n.ref == 0)

    def reset(self) -> bool:
        """Drop every cached page (flush); refused while any request holds a lock."""
        if any(n.ref for n in self.nodes()):
            return False
        self.evict(self.num_pages)
        if self.listener is not None:
            self.listener.cleared()
        return True

    def media(self, node: Node) -> tuple[str, ...]:
        """The tiers holding a node's page (KV events' `medium`): the device only, without tiers."""
        return (MEDIUM_DEVICE,)

    def nodes(self):
        """Every cached node, parents before children (snapshots)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def attach_listener(self, listener: CacheListener) -> None:
        """Hash the nodes already cached (a listener attached after start) and report to `listener`."""
        self.listener = listener
        for node in self.nodes():
            assert node.parent is not None
            node.hash = page_hash(node.parent.hash, node.key)
