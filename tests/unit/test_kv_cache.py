"""Page allocator, radix prefix cache and KV manager: exact page ids and eviction order."""

from __future__ import annotations

import pytest

from pdserve.engine.kv_cache import OutOfPages, PageAllocator
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams


def req(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid=rid, prompt_len=len(tokens), params=SamplingParams(), tokens=list(tokens))


def test_allocator_hands_out_ids_in_order_and_never_page_zero() -> None:
    a = PageAllocator(6)
    assert a.capacity == 5
    assert a.alloc(3) == [1, 2, 3]
    a.free([2])
    assert a.alloc(1) == [2]
    assert a.alloc(2) == [4, 5]
    with pytest.raises(OutOfPages):
        a.alloc(1)


def test_allocator_rejects_double_free() -> None:
    a = PageAllocator(4)
    p = a.alloc(1)
    a.free(p)
    with pytest.raises(AssertionError, match="double free"):
        a.free(p)


def test_prefix_match_insert_and_duplicates() -> None:
    a = PageAllocator(16)
    c = PrefixCache(a, page_size=2)
    pages = a.alloc(3)  # [1, 2, 3] hold tokens 0..5
    table, node = c.insert([0, 1, 2, 3, 4, 5, 6], pages)  # 3 full pages; token 6 is partial
    assert table == [1, 2, 3] and node.depth == 3 and c.num_pages == 3
    assert c.match([0, 1, 2, 3, 9, 9])[0] == [1, 2]
    assert c.match([0, 1, 2])[0] == [1]
    assert c.match([7, 7])[0] == []
    # a second request computed the same first two pages privately into pages 4, 5
    dup = a.alloc(2)
    table, _ = c.insert([0, 1, 2, 3], dup)
    assert table == [1, 2]  # the tree's pages win; 4 and 5 were freed
    assert a.alloc(2) == [4, 5]


def test_eviction_is_lru_over_unlocked_leaves() -> None:
    a = PageAllocator(8)
    c = PrefixCache(a, page_size=1)
    c.insert([10, 11], a.alloc(2))  # pages 1 (10) -> 2 (11)
    c.insert([20], a.alloc(1))  # page 3
    c.insert([30], a.alloc(1))  # page 4
    c.match([20])  # touch 20: now 30 is the least recently used leaf... after 10->11
    _, node = c.match([10, 11])
    c.lock(node)  # 10 -> 11 in use: not evictable
    assert c.evictable_pages() == 2
    freed_before = a.num_free
    assert c.evict(1) == 1 and a.num_free == freed_before + 1
    assert c.match([30])[0] == [] and c.match([20])[0] == [3]  # 30 went first (LRU)
    assert c.evict(5) == 1  # only 20 left to evict; 10 -> 11 is locked
    c.unlock(node)
    assert c.evict(5) == 2 and c.num_pages == 0
    assert a.num_free == a.capacity


def test_eviction_frees_leaf_then_parent() -> None:
    a = PageAllocator(8)
    c = PrefixCache(a, page_size=1)
    c.insert([1, 2, 3], a.alloc(3))  # pages 1 -> 2 -> 3
    assert c.evict(1) == 1 and c.match([1, 2, 3])[0] == [1, 2]
    assert c.evict(2) == 2 and c.num_pages == 0


def test_reset_refused_while_locked() -> None:
    a = PageAllocator(8)
    c = PrefixCache(a, page_size=1)
    _, node = c.insert([1, 2], a.alloc(2))
    c.lock(node)
    assert c.reset() is False
    c.unlock(node)
    assert c.reset() is True and a.num_free == a.capacity


def test_manager_prefix_reuse_release_and_integrity() -> None:
    kv = KVManager(num_pages=9, page_size=2, enable_prefix_cache=True)  # 8 usable pages
    r1 = req([5, 6, 7, 8, 9])
    kv.attach_prefix(r1)
    assert r1.pages == [] and r1.num_computed == 0
    assert kv.ensure_pages(r1, 5) and r1.pages == [1, 2, 3]
    r1.num_computed = 5
    kv.check_integrity([r1])
    kv.release(r1)  # pages 1, 2 cached (tokens 5..8), page 3 (partial) freed
    assert kv.cache.num_pages == 2 and kv.allocator.num_free == 6
    kv.check_integrity([])
    r2 = req([5, 6, 7, 8, 1, 2], "r2")
    kv.attach_prefix(r2)
    assert r2.pages == [1, 2] and r2.num_computed == 4 and r2.tree_pages == 2
    assert kv.ensure_pages(r2, 6) and r2.pages == [1, 2, 3]
    kv.check_integrity([r2])
    assert kv.cache.evictable_pages() == 0  # locked by r2
    kv.release(r2, keep_in_cache=False)
    kv.check_integrity([])
    assert kv.cache.evictable_pages() == 2


def test_manager_evicts_cache_when_pool_is_short() -> None:
    kv = KVManager(num_pages=5, page_size=2, enable_prefix_cache=True)  # 4 usable
    r1 = req([1, 2, 3, 4, 5, 6, 7, 8])
    kv.attach_prefix(r1)
    assert kv.ensure_pages(r1, 8)
    r1.num_computed = 8
    kv.release(r1)
    assert kv.allocator.num_free == 0 and kv.cache.num_pages == 4
    r2 = req([9, 9, 9, 9, 9], "r2")
    kv.attach_prefix(r2)
    assert kv.ensure_pages(r2, 5)  # evicts 3 LRU leaves... pages freed from the deepest up
    assert sorted(r2.pages) == [2, 3, 4]
    assert kv.cache.match([1, 2, 3, 4])[0] == [1]
    kv.check_integrity([r2])
    assert not kv.ensure_pages(r2, 11)  # more than the pool
