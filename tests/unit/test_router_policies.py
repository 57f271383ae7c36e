"""Router policies and the approximate radix tree (no processes, no sockets)."""

from __future__ import annotations

import random

import pytest

from pdserve.router.config import CircuitConfig, PolicyConfig, WorkerSpec
from pdserve.router.policies import (CacheAwarePolicy, PowerOfTwoPolicy, RadixTree, RandomPolicy, RoundRobinPolicy,
                                     make_policy)
from pdserve.router.workers import Worker


def workers(n: int) -> list[Worker]:
    return [Worker(WorkerSpec(f"http://127.0.0.1:{9000 + i}"), CircuitConfig(), None, True) for i in range(n)]


def text(s: str):
    return lambda: s


def test_round_robin_cycles_in_order() -> None:
    ws = workers(3)
    p = RoundRobinPolicy()
    assert [p.select(ws, text("")).url for _ in range(6)] == [w.url for w in ws] * 2


def test_random_covers_all_workers() -> None:
    ws = workers(3)
    p = RandomPolicy(random.Random(0))
    assert {p.select(ws, text("")).url for _ in range(100)} == {w.url for w in ws}


def test_power_of_two_prefers_less_loaded() -> None:
    ws = workers(2)
    ws[0].load, ws[1].load = 10, 1
    p = PowerOfTwoPolicy(random.Random(0))
    assert all(p.select(ws, text("")) is ws[1] for _ in range(20))
    ws[1].in_flight = 20  # local in-flight counts too
    assert p.select(ws, text("")) is ws[0]


def test_make_policy_names() -> None:
    for name in ("random", "round_robin", "power_of_two", "cache_aware"):
        assert make_policy(PolicyConfig(name)).name == name
    with pytest.raises(ValueError):
        PolicyConfig("fastest")


def test_radix_tree_match_split_and_sizes() -> None:
    t = RadixTree()
    t.insert("hello world", "a", 1.0)
    t.insert("hello there", "b", 2.0)
    assert t.sizes == {"a": 11, "b": 11}
    assert t.match("hello world!", {"a", "b"}) == (11, "a")
    assert t.match("hello th", {"a", "b"}) == (8, "b")
    assert t.match("hello", {"a", "b"}) == (5, "b")  # both hold it: the most recent wins
    assert t.match("hello", {"a"}) == (5, "a")
    assert t.match("bye", {"a", "b"}) == (0, None)
    assert t.match("hello world", {"c"}) == (0, None)


def test_radix_tree_evicts_lru_leaves_to_budget() -> None:
    t = RadixTree()
    t.insert("aaaa1111", "w", 1.0)  # oldest
    t.insert("aaaa2222", "w", 2.0)
    t.insert("bbbb3333", "w", 3.0)
    assert t.sizes["w"] == 4 + 4 + 4 + 8
    freed = t.evict("w", 16)
    assert freed == 4 and t.sizes["w"] == 16
    assert t.match("aaaa1111", {"w"}) == (4, "w")  # the old leaf went, the shared prefix stays
    assert t.match("aaaa2222", {"w"}) == (8, "w")
    t.evict("w", 8)
    assert t.sizes["w"] <= 8
    assert t.match("bbbb3333", {"w"}) == (8, "w")  # the most recent survives


def test_radix_tree_remove_tenant() -> None:
    t = RadixTree()
    t.insert("shared prefix one", "a", 1.0)
    t.insert("shared prefix two", "b", 1.0)
    t.remove_tenant("a")
    assert "a" not in t.sizes
    assert t.match("shared prefix one", {"a", "b"}) == (14, "b")


def cache_policy(**kw) -> CacheAwarePolicy:
    return CacheAwarePolicy(PolicyConfig("cache_aware", **kw))


def test_cache_aware_hit_above_threshold_and_smallest_tree_below() -> None:
    ws = workers(2)
    p = cache_policy(cache_threshold=0.3)
    first = p.select(ws, text("a" * 100))
    assert p.last_reason == "smallest_tree"
    assert p.select(ws, text("a" * 100 + "b" * 50)) is first  # 100/150 matched > 0.3
    assert p.last_reason == "cache_hit"
    other = p.select(ws, text("z" * 10 + "a" * 90))  # no match: the other (empty) tree
    assert other is not first and p.last_reason == "smallest_tree"
    # 30 of 100 chars matched = 0.3, not above the threshold: smallest tree again
    p2 = cache_policy(cache_threshold=0.3)
    w = p2.select(ws, text("q" * 30))
    p2.select(ws, text("r" * 200))  # make the other tree... whichever is smaller gets it
    choice = p2.select(ws, text("q" * 30 + "s" * 70))
    assert p2.last_reason == "smallest_tree" and choice is w


@pytest.mark.parametrize("loads,balanced", [
    ((65, 0), False),   # 65 - 0 > 64 and 65 > 1.5*0: imbalanced
    ((64, 0), True),    # diff 64 is not > 64
    ((200, 134), True),  # diff 66 > 64 but 200 <= 1.5*134 = 201
    ((202, 134), False),  # diff 68 and 202 > 201
])
def test_cache_aware_balance_thresholds(loads: tuple[int, int], balanced: bool) -> None:
    ws = workers(2)
    p = cache_policy(balance_abs_threshold=64, balance_rel_threshold=1.5)
    ws[0].in_flight, ws[1].in_flight = loads
    p.tree.insert("x" * 100, ws[0].url, 1.0)  # a perfect cache hit on the busy worker
    chosen = p.select(ws, text("x" * 100))
    if balanced:
        assert chosen is ws[0] and p.last_reason == "cache_hit"
    else:
        assert chosen is ws[1] and p.last_reason == "balance"


def test_cache_aware_ignores_unroutable_tenants_and_forgets_removed() -> None:
    ws = workers(3)
    p = cache_policy()
    p.tree.insert("prompt " * 20, ws[0].url, 1.0)
    assert p.select(ws[1:], text("prompt " * 20)) in ws[1:]  # ws[0] is not a candidate now
    p.on_removed(ws[0])
    assert ws[0].url not in p.tree.sizes


def test_cache_aware_maintain_evicts_to_max_tree_size() -> None:
    ws = workers(1)
    p = cache_policy(max_tree_size=50)
    for i in range(10):
        p.select(ws, text(f"{i} " + "y" * 30))
    assert p.tree.sizes[ws[0].url] > 50
    p.maintain()
    assert p.tree.sizes[ws[0].url] <= 50
