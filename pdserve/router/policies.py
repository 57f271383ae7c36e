"""Load-balancing policies: pick one worker from a non-empty list of routable candidates.

`random` and `round_robin` need nothing; `power_of_two` samples two candidates and takes the
less loaded, where load is the worker's last `/get_load` answer plus the requests this router
has in flight to it; `cache_aware` (cache_aware.py) routes by approximate prefix-cache hits.
Policies see the request only through a `text()` callable, evaluated only by policies that
need it (`needs_text`), so the others never parse a body. Each role gets its own instance.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from pdserve.router.config import PolicyConfig
from pdserve.router.workers import Worker

TextFn = Callable[[], str]


class Policy:
    name = "base"
    needs_text = False

    def select(self, workers: Sequence[Worker], text: TextFn) -> Worker:
        raise NotImplementedError

    def on_removed(self, worker: Worker) -> None:
        """A worker left the registry."""

    def maintain(self) -> None:
        """Periodic housekeeping (eviction)."""


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], text: TextFn) -> Worker:
        return workers[self._rng.randrange(len(workers))] if len(workers) > 1 else workers[0]


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[Worker], text: TextFn) -> Worker:
        i = self._next
        self._next = i + 1
        return workers[i % len(workers)]


def worker_load(w: Worker) -> int:
    return w.load + w.in_flight


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], text: TextFn) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(range(len(workers)), 2)
        wa, wb = workers[a], workers[b]
        return wa if worker_load(wa) <= worker_load(wb) else wb


def make_policy(cfg: PolicyConfig) -> Policy:
    if cfg.name == "random":
        return RandomPolicy()
    if cfg.name == "round_robin":
        return RoundRobinPolicy()
    if cfg.name == "power_of_two":
        return PowerOfTwoPolicy()
    from pdserve.router.cache_aware import CacheAwarePolicy

    return CacheAwarePolicy(cfg)
