"""Load-balancing policies: pick one worker from a non-empty list of routable candidates.

`random` and `round_robin` need nothing; `power_of_two` samples two candidates and takes the
less loaded, where load is the worker's last `/get_load` answer plus the requests this router
has in flight to it; `cache_aware` routes by approximate prefix-cache hits. Policies see the
request only through a `text()` callable, evaluated only by policies that need it
(`needs_text`), so the others never parse a body. Each role gets its own instance
(`make_policy`).

`cache_aware` per request (SGLang's rules and thresholds):
  1. imbalanced load — `max - min > balance_abs_threshold` and `max > balance_rel_threshold *
     min` over the candidates' in-flight counts — goes to the least loaded worker;
  2. otherwise the longest prefix match in the approximate tree decides when its match rate
     (matched chars / text chars) is above `cache_threshold`;
  3. else the worker with the smallest tree (least cached text) gets it.
Workers that publish KV events are matched exactly instead (`exact`: cached prefix tokens /
prompt tokens, from router/kv_index.py, where a page a worker can fetch from its KV tiers' shared
store counts 0.75 of one it holds); the approximate tree still answers for the others, and the
better rate of the two decides rule 2.
The chosen worker's tree then takes the text. `maintain()` (run every
`eviction_interval_s` by the app) evicts LRU leaves down to `max_tree_size` per worker.

Its `RadixTree` holds request text per worker ("tenant") and mirrors the router's guess of each
worker's prefix cache: every routed request's text is inserted for the worker it went to;
`match` finds the longest stored prefix of a new text among allowed workers; `evict` trims a
worker's share to a size budget by dropping its least recently used leaves. Edges hold strings
(not single chars); splits keep tenant sets, so the tree stays prefix-closed: a tenant on a
node is on all its ancestors. Sizes count characters.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable, Container, Sequence

from pdserve.router.config import PolicyConfig
from pdserve.router.workers import Worker

TextFn = Callable[[], str]
Exact = tuple[dict[str, int], int]  # (cached prefix tokens per indexed worker, prompt tokens): kv_index.py


class Policy:
    name = "base"
    needs_text = False
    uses_index = False  # wants exact KV-index hits (router/kv_index.py) when workers publish events

    def select(self, workers: Sequence[Worker], text: TextFn, exact: Exact | None = None) -> Worker:
        raise NotImplementedError

    def on_removed(self, worker: Worker) -> None:
        """A worker left the registry."""

    def maintain(self) -> None:
        """Periodic housekeeping (eviction)."""


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], text: TextFn, exact: Exact | None = None) -> Worker:
        return workers[self._rng.randrange(len(workers))] if len(workers) > 1 else workers[0]


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[Worker], text: TextFn, exact: Exact | None = None) -> Worker:
        i = self._next
        self._next = i + 1
        return workers[i % len(workers)]


def worker_load(w: Worker) -> int:
    return w.load + w.in_flight


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], text: TextFn, exact: Exact | None = None) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(range(len(workers)), 2)
        wa, wb = workers[a], workers[b]
        return wa if worker_load(wa) <= worker_load(wb) else wb


# -- cache_aware: the approximate radix tree --------------------------------------------------
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


# -- cache_aware: the policy ------------------------------------------------------------------
class CacheAwarePolicy(Policy):
    name = "cache_aware"
    needs_text = True
    uses_index = True

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.tree = RadixTree()
        self.last_reason = ""  # why the last pick was made (tests, debugging)

    def imbalanced(self, workers: Sequence[Worker]) -> bool:
        loads = [w.in_flight for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.cfg.balance_abs_threshold and hi > self.cfg.balance_rel_threshold * lo

    def select(self, workers: Sequence[Worker], text: TextFn, exact: Exact | None = None) -> Worker:
        s = text()
        if len(workers) == 1:
            chosen = workers[0]
            self.last_reason = "only"
        elif self.imbalanced(workers):
            chosen = min(workers, key=lambda w: w.in_flight)
            self.last_reason = "balance"
        else:
            by_url = {w.url: w for w in workers}
            hits, n_tokens = exact if exact is not None else ({}, 0)
            approx = {u: w for u, w in by_url.items() if u not in hits}  # workers that publish nothing
            matched, tenant = self.tree.match(s, approx)
            rate = matched / len(s) if s and tenant is not None else 0.0
            reason = "cache_hit"
            if hits and n_tokens:
                best = max(hits, key=hits.__getitem__)
                if hits[best] / n_tokens >= rate and hits[best] > 0:
                    tenant, rate, reason = best, hits[best] / n_tokens, "exact_hit"
            if tenant is not None and rate > self.cfg.cache_threshold:
                chosen = by_url[tenant]
                self.last_reason = reason
            else:
                sizes = self.tree.sizes
                chosen = min(workers, key=lambda w: sizes.get(w.url, 0))
                self.last_reason = "smallest_tree"
        if s:
            self.tree.insert(s, chosen.url, time.monotonic())
        return chosen

    def on_removed(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker.url)

    def maintain(self) -> None:
        for tenant in list(self.tree.sizes):
            self.tree.evict(tenant, self.cfg.max_tree_size)


def make_policy(cfg: PolicyConfig) -> Policy:
    if cfg.name == "random":
        return RandomPolicy()
    if cfg.name == "round_robin":
        return RoundRobinPolicy()
    if cfg.name == "power_of_two":
        return PowerOfTwoPolicy()
    return CacheAwarePolicy(cfg)
