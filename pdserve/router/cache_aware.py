"""`cache_aware` policy: send a request where its prefix is most likely already cached.

Per request (SGLang's rules and thresholds):
  1. imbalanced load — `max - min > balance_abs_threshold` and `max > balance_rel_threshold *
     min` over the candidates' in-flight counts — goes to the least loaded worker;
  2. otherwise the longest prefix match in the approximate tree decides when its match rate
     (matched chars / text chars) is above `cache_threshold`;
  3. else the worker with the smallest tree (least cached text) gets it.
The chosen worker's tree then takes the text. `maintain()` (run every
`eviction_interval_s` by the app) evicts LRU leaves down to `max_tree_size` per worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdserve.router.config import PolicyConfig
from pdserve.router.policies import Policy, TextFn
from pdserve.router.radix_tree import RadixTree
from pdserve.router.workers import Worker


class CacheAwarePolicy(Policy):
    name = "cache_aware"
    needs_text = True

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.tree = RadixTree()
        self.last_reason = ""  # why the last pick was made (tests, debugging)

    def imbalanced(self, workers: Sequence[Worker]) -> bool:
        loads = [w.in_flight for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.cfg.balance_abs_threshold and hi > self.cfg.balance_rel_threshold * lo

    def select(self, workers: Sequence[Worker], text: TextFn) -> Worker:
        s = text()
        if len(workers) == 1:
            chosen = workers[0]
            self.last_reason = "only"
        elif self.imbalanced(workers):
            chosen = min(workers, key=lambda w: w.in_flight)
            self.last_reason = "balance"
        else:
            by_url = {w.url: w for w in workers}
            matched, tenant = self.tree.match(s, by_url)
            if s and tenant is not None and matched / len(s) > self.cfg.cache_threshold:
                chosen = by_url[tenant]
                self.last_reason = "cache_hit"
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
