"""The radix cache as the index of every tier: device pages, host slots, storage.

A node's page lives in one or more tiers:

    page != NO_PAGE   on the device (KV pool page id)      host != NO_SLOT   a host-tier copy
    stored            in storage (written or read there)   copying/storing   copies in flight

Shape of the tree (checked by `check`): every node is on the device or in host (a node in
neither leaves the tree); device nodes form a prefix-closed subtree (a device node's parent is
on the device), so a prompt's device hit is a path from the root and its lower-tier hit is the
path's continuation:

    root ─ A:p3,h1 ─ B:p5 ─ C:-,h4 ─ D:-,h0        match → [p3, p5]; match_tiers → [A, B], [C, D]

Lifecycle of a page across tiers (policies: tiers.py):
  insert      on the device; write-through policies back it up to host (copy thread), then storage
  evict (dev) LRU among unlocked device nodes with no device child: with a host copy the device
              page is just freed; else it is demoted (one synchronous batch copy into host slots);
              a leaf with no host room is dropped as without tiers
  evict(host) LRU among host copies: a host-only leaf leaves the tree (write_back: its bytes go
              to storage first); a device node just loses its copy
  load        host -> device pages before a request is admitted (copy thread), its path locked
              while it runs and pinned (evicted last) until the request is admitted
  fetch       storage -> host slots (storage thread), new host-only nodes under the locked anchor
Loads and fetches are started, and every finished copy applied to the tree, by moves.py.
"""

from __future__ import annotations

import heapq
from typing import Callable

from pdserve.engine.kv_cache import PageAllocator
from pdserve.engine.kv_tiers.tiers import Copy, KVTiers
from pdserve.engine.prefix_cache import NO_PAGE, NO_SLOT, Node, PrefixCache
from pdserve.kv_events import MEDIUM_DEVICE, MEDIUM_HOST, page_hash


class TieredPrefixCache(PrefixCache):
    def __init__(self, allocator: PageAllocator, page_size: int, tiers: KVTiers) -> None:
        super().__init__(allocator, page_size, enabled=True)
        self.tiers = tiers
        self.policy = tiers.cfg.write_policy
        self.num_host = 0  # host slots held by nodes
        self._fresh: list[Node] = []  # nodes that got a device page in this insert
        self._pins: dict[Node, int] = {}  # paths a waiting request's copies brought in: evicted last

    # -- pins: an eviction preference, never a reservation ------------------------------------
    def pin(self, node: Node) -> None:
        self._pins[node] = self._pins.get(node, 0) + 1

    def unpin(self, node: Node) -> None:
        if self._pins[node] == 1:
            del self._pins[node]
        else:
            self._pins[node] -= 1

    def _victims(self, ok: Callable[[Node], bool]) -> tuple[list[tuple[bool, int, int, Node]], set[Node]]:
        """A heap of nodes passing `ok`: unpinned least recently used first, then pinned ones
        (on a pinned path); and the pinned nodes, for what the caller pushes later."""
        pinned: set[Node] = set()
        for n in self._pins:
            if n.parent is None or n.parent.children.get(n.key) is not n:
                continue  # evicted from every tier since it was pinned
            while n is not None and n not in pinned:
                pinned.add(n)
                n = n.parent  # type: ignore[assignment]
        heap = [(n in pinned, n.last_access, id(n), n) for n in self.nodes() if ok(n)]
        heapq.heapify(heap)
        return heap, pinned

    def touch(self, node: Node) -> None:
        self._touch(node)

    # -- match -------------------------------------------------------------------------------
    def path(self, tokens: list[int]) -> list[Node]:
        """The nodes spelling the leading full pages of `tokens`, in any tier."""
        node, out = self.root, []
        for key in self._keys(tokens, len(tokens) // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            out.append(child)
            node = child
        return out

    def match_tiers(self, tokens: list[int]) -> tuple[list[Node], list[Node]]:
        """Nodes of the longest cached prefix: those on the device, then those only in host
        (stopping at a page being loaded already)."""
        node, dev, low = self.root, [], []
        for key in self._keys(tokens, len(tokens) // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            if child.page != NO_PAGE and not low:
                dev.append(child)
            elif child.page == NO_PAGE and child.host != NO_SLOT and not child.copying:
                low.append(child)
            else:
                break
            node = child
        return dev, low

    # -- insert (device pages) ----------------------------------------------------------------
    def _new_node(self, key: tuple[int, ...], page: int, parent: Node, new: list[Node]) -> Node:
        child = super()._new_node(key, page, parent, new)
        if self.listener is None:
            child.hash = page_hash(parent.hash, key)
        self._fresh.append(child)
        return child

    def _adopt(self, node: Node, page: int) -> None:
        super()._adopt(node, page)
        self._fresh.append(node)

    def _report_stored(self, new: list[Node]) -> None:
        super()._report_stored(new)
        fresh, self._fresh = self._fresh, []
        if len(fresh) > len(new):  # nodes of a lower tier that took a freshly computed page
            known = set(new)
            self.tell_stored([n for n in fresh if n not in known], MEDIUM_DEVICE)
        if self.policy == "write_through" and fresh:
            self._backup(fresh)

    def tell_stored(self, nodes: list[Node], medium: str) -> None:
        """KV events: `nodes` entered tier `medium`, one BlockStored per chain among them."""
        if self.listener is None or not nodes:
            return
        run = [nodes[0]]
        for n in [*nodes[1:], None]:
            if n is not None and n.parent is run[-1]:
                run.append(n)
                continue
            assert run[0].parent is not None
            self.listener.stored(run[0].parent.hash, run, medium)
            if n is not None:
                run = [n]

    def tell_removed(self, nodes: list[Node], medium: str | None) -> None:
        if self.listener is not None and nodes:
            self.listener.removed(nodes, medium)

    def media(self, node: Node) -> tuple[str, ...]:
        out = (MEDIUM_DEVICE,) if node.page != NO_PAGE else ()
        out += (MEDIUM_HOST,) if node.host != NO_SLOT else ()
        return out + ((self.tiers.storage_medium,) if node.stored and self.tiers.store is not None else ())

    def _backup(self, nodes: list[Node], store: bool = False) -> None:
        """Copy device pages to host (copy thread); pages already in host go on to storage (with
        `store`, all of them go on to storage once in host, whatever the policy)."""
        todo = [n for n in nodes if n.page != NO_PAGE and n.host == NO_SLOT and not n.copying]
        self.store_pages([n for n in nodes if n.host != NO_SLOT and (store or self.writes_through(n))])
        slots = self.host_alloc(len(todo))
        todo = todo[:len(slots)]
        if not todo:
            return
        for n, s in zip(todo, slots):
            n.host, n.copying = s, n.copying + 1
            self.num_host += 1
        self.tiers.submit(Copy("backup", nodes=todo, pages=[n.page for n in todo], slots=slots, then_store=store))

    def store_pages(self, nodes: list[Node]) -> None:
        """Write host copies to storage (storage thread)."""
        if self.tiers.store is None:
            return
        todo = [n for n in nodes if n.host != NO_SLOT and not n.stored and not n.storing and not n.copying]
        if not todo:
            return
        for n in todo:
            n.storing += 1
        self.tiers.submit(Copy("store", nodes=todo, slots=[n.host for n in todo], hashes=[n.hash for n in todo]))

    def writes_through(self, node: Node) -> bool:
        return self.policy == "write_through" or (
            self.policy == "write_through_selective" and node.hits >= self.tiers.cfg.hot_hits)

    # -- eviction ------------------------------------------------------------------------------
    def _device_evictable(self, n: Node) -> bool:
        return (n.page != NO_PAGE and n.ref == 0 and not n.copying and n is not self.root
                and not any(c.page != NO_PAGE for c in n.children.values()))

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` device pages, least recently used first, demoting to host."""
        heap, pinned = self._victims(self._device_evictable)
        freed: list[int] = []
        gone: list[Node] = []  # left the tree (every tier of this instance)
        left: list[Node] = []  # left the device, still in host
        moved: list[tuple[Node, int]] = []  # (node, its old device page) demoted in this call
        while heap and len(freed) + len(moved) < num_pages:
            node = heapq.heappop(heap)[3]
            if not self._device_evictable(node):
                continue  # pushed twice, or changed since it was pushed
            if node.host == NO_SLOT:
                slot = self.host_alloc(1)
                if not slot and moved:  # host is full of this batch: finish it, its pages may go on
                    self._demoted(moved, freed)
                    moved, slot = [], self.host_alloc(1)
                slot = slot or (self._prune(node, gone) and self.host_alloc(1))
                if slot:
                    node.host, node.copying = slot[0], node.copying + 1
                    self.num_host += 1
                    moved.append((node, node.page))
                    left.append(node)
                elif not node.children:
                    parent = node.parent
                    assert parent is not None
                    del parent.children[node.key]
                    gone.append(node)
                    freed.append(node.page)
                else:
                    continue
            else:
                freed.append(node.page)
                left.append(node)
            node.page = NO_PAGE
            self.num_pages -= 1
            parent = node.parent
            if parent is not None and self._device_evictable(parent):
                heapq.heappush(heap, (parent in pinned, parent.last_access, id(parent), parent))
        self._demoted(moved, freed)
        self.tiers.counters.dropped += len(gone)
        if freed:
            self.allocator.free(freed)
        self.tell_removed(left, MEDIUM_DEVICE)
        self.tell_removed(gone, None)
        return len(freed)

    def _demoted(self, moved: list[tuple[Node, int]], freed: list[int]) -> None:
        """The tier demotes a batch of nodes (their device pages copied into their host slots,
        `TierMoves.demote`); the pages are free then."""
        if not moved:
            return
        for n, p in moved:
            n.page = p  # its bytes are still there until the copy returns
        self.tier.demote([n for n, _ in moved])
        for n, p in moved:
            n.page, n.copying = NO_PAGE, n.copying - 1
            freed.append(p)
        self.store_pages([n for n, _ in moved if self.writes_through(n)])

    def _prune(self, node: Node, gone: list[Node]) -> bool:
        """The host tier is full of pages that cannot go: drop `node`'s (host-only) subtree, its
        least useful pages, so that `node` itself can be demoted. False if a copy holds one."""
        below = [n for n in self.nodes() if self._is_below(n, node)]
        if not below or any(n.copying or n.storing for n in below):
            return False
        node.children.clear()
        self.tiers.host.allocator.free([n.host for n in below])
        self.num_host -= len(below)
        self.tiers.counters.dropped += len(below)
        gone += below
        return True

    @staticmethod
    def _is_below(n: Node, top: Node) -> bool:
        while n.parent is not None:
            if n.parent is top:
                return True
            n = n.parent
        return False

    def evictable_pages(self) -> int:
        """Device pages `evict` can free: unlocked, and no copy in flight at or below them (a node
        leaves the device only after its device children)."""
        blocked: set[Node] = set()
        count = 0
        for n in reversed(list(self.nodes())):  # children before parents
            if n.page == NO_PAGE:
                continue
            if n.ref or n.copying or n in blocked:
                if n.parent is not None:
                    blocked.add(n.parent)
                continue
            count += 1
        return count

    def _host_evictable(self, n: Node) -> bool:
        return (n.host != NO_SLOT and not n.copying and not n.storing
                and (n.page != NO_PAGE or (n.ref == 0 and not n.children)))

    def host_alloc(self, n: int) -> list[int]:
        """Up to `n` host slots, evicting host copies (LRU) when the tier is full."""
        slots = self.tiers.host.allocator.alloc(n)
        if len(slots) < n:
            self.evict_host(n - len(slots))
            slots += self.tiers.host.allocator.alloc(n - len(slots))
        return slots

    def evict_host(self, num_slots: int) -> int:
        heap, pinned = self._victims(self._host_evictable)
        freed: list[int] = []
        gone: list[Node] = []
        kept: list[Node] = []  # device nodes that lost their host copy
        while heap and len(freed) < num_slots:
            node = heapq.heappop(heap)[3]
            if not self._host_evictable(node):
                continue  # pushed twice (a device node with a host copy is a candidate, then its parent too)
            if node.page != NO_PAGE:
                kept.append(node)
            else:  # host-only leaf: it leaves the tree
                if self.policy == "write_back" and not node.stored:
                    self.tiers.write_back(node.hash, node.host)
                parent = node.parent
                assert parent is not None
                del parent.children[node.key]
                gone.append(node)
                if parent is not self.root and self._host_evictable(parent):
                    heapq.heappush(heap, (parent in pinned, parent.last_access, id(parent), parent))
            freed.append(node.host)
            node.host = NO_SLOT
        self.num_host -= len(freed)
        self.tiers.counters.host_evicted += len(freed)
        self.tiers.host.allocator.free(freed)
        self.tell_removed(kept, MEDIUM_HOST)
        self.tell_removed(gone, None)
        return len(freed)

    def reset(self) -> bool:
        """Drop every page of every tier (flush); refused while a request or a copy holds one."""
        if any(n.ref or n.copying or n.storing for n in self.nodes()) or self.tiers.pending:
            return False
        nodes = list(self.nodes())
        self.allocator.free([n.page for n in nodes if n.page != NO_PAGE])
        self.tiers.host.allocator.free([n.host for n in nodes if n.host != NO_SLOT])
        self.root.children.clear()
        self.num_pages = self.num_host = 0
        if self.listener is not None:
            self.listener.cleared()
        return True

    def check(self) -> None:
        """Every node is in some tier, device nodes are prefix-closed, counts match, host slots add up."""
        dev = host = 0
        for n in self.nodes():
            assert n.page != NO_PAGE or n.host != NO_SLOT, "a cache node in no tier"
            assert n.parent is not None
            if n.page != NO_PAGE:
                dev += 1
                assert n.parent is self.root or n.parent.page != NO_PAGE, "a device node under a non-device one"
            host += n.host != NO_SLOT
        assert dev == self.num_pages, f"device nodes {dev} != counted {self.num_pages}"
        assert host == self.num_host, f"host nodes {host} != counted {self.num_host}"
        a = self.tiers.host.allocator
        total = a.num_free + self.num_host + self.tiers.slots_in_flight
        assert total == a.capacity, (
            f"host KV slots leaked: free {a.num_free} + cached {self.num_host} + in flight "
            f"{self.tiers.slots_in_flight} = {total} != {a.capacity}")
