"""Approximate radix tree of request text per worker ("tenant"), for cache-aware routing.

Mirrors the router's guess of each worker's prefix cache: every routed request's text is
inserted for the worker it went to; `match` finds the longest stored prefix of a new text
among allowed workers; `evict` trims a worker's share to a size budget by dropping its least
recently used leaves. Edges hold strings (not single chars); splits keep tenant sets, so the
tree stays prefix-closed: a tenant on a node is on all its ancestors. Sizes count characters.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container


class Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, Node] = {}
        self.tenants: dict[str, float] = {}  # tenant -> last access time


def _common_len(label: str, text: str, start: int) -> int:
    """Length of the common prefix of `label` and `text[start:]` (binary search on C compares)."""
    lo, hi = 0, min(len(label), len(text) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixTree:
    def __init__(self) -> None:
        self.root = Node("", None)
        self.sizes: dict[str, int] = {}

    def insert(self, text: str, tenant: str, now: float) -> None:
        node, i, n = self.root, 0, len(text)
        node.tenants[tenant] = now
        self.sizes.setdefault(tenant, 0)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                new = Node(text[i:], node)
                new.tenants[tenant] = now
                node.children[text[i]] = new
                self.sizes[tenant] += n - i
                return
            label = child.text
            k = len(label) if text.startswith(label, i) else _common_len(label, text, i)
            if k < len(label):  # split the edge at k
                mid = Node(label[:k], node)
                mid.tenants = dict(child.tenants)
                node.children[text[i]] = mid
                child.text = label[k:]
                child.parent = mid
                mid.children[child.text[0]] = child
                child = mid
            if tenant not in child.tenants:
                self.sizes[tenant] += len(child.text)
            child.tenants[tenant] = now
            node = child
            i += k

    def match(self, text: str, allowed: Container[str]) -> tuple[int, str | None]:
        """(matched characters, most recent allowed tenant holding that prefix)."""
        node, i, n = self.root, 0, len(text)
        best: str | None = None
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            holders = [t for t in child.tenants if t in allowed]
            if not holders:
                break
            label = child.text
            k = len(label) if text.startswith(label, i) else _common_len(label, text, i)
            i += k
            best = max(holders, key=child.tenants.__getitem__)
            if k < len(label):
                break
            node = child
        return (i, best) if best is not None else (0, None)

    def _leaves_of(self, tenant: str) -> list[tuple[float, int, Node]]:
        out: list[tuple[float, int, Node]] = []
        counter = itertools.count()
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if tenant not in node.tenants:
                continue
            kids = [c for c in node.children.values() if tenant in c.tenants]
            if kids:
                stack.extend(kids)
            else:
                out.append((node.tenants[tenant], next(counter), node))
        return out

    def evict(self, tenant: str, max_size: int) -> int:
        """Drop the tenant's least recently used leaves until its size <= max_size; chars freed."""
        size = self.sizes.get(tenant, 0)
        if size <= max_size:
            return 0
        heap = self._leaves_of(tenant)
        heapq.heapify(heap)
        counter = itertools.count(len(heap))
        freed = 0
        while heap and size - freed > max_size:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            freed += len(node.text)
            parent = node.parent
            if not node.tenants and not node.children and parent is not None:
                parent.children.pop(node.text[0], None)
            if parent is not None and parent is not self.root and tenant in parent.tenants \
                    and not any(tenant in c.tenants for c in parent.children.values()):
                heapq.heappush(heap, (parent.tenants[tenant], next(counter), parent))
        self.sizes[tenant] = size - freed
        return freed

    def remove_tenant(self, tenant: str) -> None:
        self.sizes.pop(tenant, None)
        self.root.tenants.pop(tenant, None)
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in list(node.children.items()):
                if tenant in child.tenants:
                    del child.tenants[tenant]
                    if not child.tenants:
                        del node.children[key]  # prefix-closed: nothing below has tenants left
                        continue
                    stack.append(child)
