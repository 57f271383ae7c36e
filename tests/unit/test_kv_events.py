"""KV events without processes: the page hash, the radix cache's events, the router's exact index
rebuilt from them (equal to the cache after churn with evictions and flushes), gap detection,
the wire format, and cache_aware's use of exact hits."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.kv_cache import PageAllocator
from pdserve.engine.kv_event_log import KVEventLog
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, chain_hashes, decode_batch,
                               encode_batch, page_hash, parse_kv_events_config)
from pdserve.router.config import CircuitConfig, PolicyConfig, WorkerSpec
from pdserve.router.kv_index import KVIndex, WorkerIndex
from pdserve.router.policies import CacheAwarePolicy
from pdserve.router.prompt_ids import tokenize_body
from pdserve.router.workers import Worker


def test_page_hash_is_stable_and_chained() -> None:
    # a fixed value: the same in every process and release (never Python's salted hash)
    assert page_hash(0, [1, 2, 3, 4]) == page_hash(0, (1, 2, 3, 4))
    assert page_hash(0, [1, 2, 3, 4]) == 0x09222804E3E39BA2  # documented in kv_events/events.py
    assert page_hash(0x09222804E3E39BA2, [5, 6, 7, 8]) == 0x6A0DC80E40B48E82
    chain = chain_hashes(list(range(10)), 4)
    assert len(chain) == 2 and chain[1] == page_hash(chain[0], [4, 5, 6, 7])
    assert chain_hashes([9, 9, 9, 9] + list(range(4, 8)), 4)[1] != chain[1]  # the parent counts
    assert all(0 <= h < 2**64 for h in chain)


def _cache(pages: int, ps: int) -> tuple[PrefixCache, KVEventLog]:
    cache = PrefixCache(PageAllocator(pages), ps)
    log = KVEventLog(cache)
    log.attach()
    return cache, log


def test_index_from_events_equals_cache_after_churn() -> None:
    rng = random.Random(0)
    ps = 4
    cache, log = _cache(64, ps)
    idx = WorkerIndex()
    idx.load(log.snapshot(0))
    seq = 0
    bases = [[rng.randrange(50) for _ in range(24)] for _ in range(4)]
    evictions = flushes = 0
    for step in range(300):
        toks = rng.choice(bases)[: rng.randrange(4, 24)] + [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
        n = len(toks) // ps
        if cache.allocator.num_free < n:
            evictions += cache.evict(n - cache.allocator.num_free)
        if cache.allocator.num_free < n:
            continue
        pages = cache.allocator.alloc(n)
        if rng.random() < 0.5:
            cache.insert(toks, pages)
        else:
            count, _ = cache.insert_own(toks, pages)
            cache.allocator.free(pages[count:])  # pages the tree did not adopt
        if step % 97 == 96:
            assert cache.reset()
            flushes += 1
        events = log.take()
        if events:
            seq += 1
            assert idx.apply(seq, decode_batch(encode_batch(KVEventBatch(ts=0.0, events=events))))
        snap = log.snapshot(seq)
        assert idx.hashes == {b.block_hash for b in snap.blocks}
        assert len(snap.blocks) == cache.num_pages
    assert evictions > 0 and flushes == 3
    # every snapshot block's hash is its chain over the tokens from the root
    by_hash = {b.block_hash: b for b in log.snapshot(seq).blocks}
    for b in by_hash.values():
        assert page_hash(b.parent_block_hash, b.token_ids) == b.block_hash
        assert b.parent_block_hash == 0 or b.parent_block_hash in by_hash


def test_index_prefix_hits_and_gaps() -> None:
    ps = 4
    cache, log = _cache(16, ps)
    toks = list(range(13))
    cache.insert(toks, cache.allocator.alloc(3))
    kv = KVIndex()
    w = kv.workers["http://a:1"] = WorkerIndex()
    assert kv.hits(["http://a:1"], toks) == {}  # not synced yet: not indexed
    w.load(log.snapshot(0))
    log.take()
    assert kv.hits(["http://a:1", "http://b:1"], toks + [99]) == {"http://a:1": 12}
    assert kv.hits(["http://a:1"], [0, 1, 2, 3, 7, 7, 7, 7]) == {"http://a:1": 4}
    assert w.apply(0, KVEventBatch(ts=0, events=[]))  # a heartbeat at the current seq
    assert not w.apply(2, KVEventBatch(ts=0, events=[AllBlocksCleared()]))  # seq 1 was lost
    assert not w.synced and kv.get("http://a:1") is None
    snap = log.snapshot(2)
    w.load(snap)
    assert w.apply(1, KVEventBatch(ts=snap.ts - 1, events=[AllBlocksCleared()]))  # old news, in the snapshot
    assert kv.hits(["http://a:1"], toks) == {"http://a:1": 12}
    assert w.apply(3, KVEventBatch(ts=snap.ts + 1, events=[BlockRemoved(block_hashes=sorted(w.hashes))]))
    assert kv.hits(["http://a:1"], toks) == {"http://a:1": 0}
    # the server restarted: its seq began again, its batches are newer than what the index holds
    assert not w.apply(1, KVEventBatch(ts=snap.ts + 2, events=[]))
    assert not w.synced


def test_wire_format_round_trip_and_config() -> None:
    batch = KVEventBatch(ts=1.5, events=[BlockStored([1, 2], None, [0] * 8, 4), BlockRemoved([3]),
                                         AllBlocksCleared()])
    assert decode_batch(encode_batch(batch)) == batch
    assert parse_kv_events_config(None) is None
    assert parse_kv_events_config("{}").endpoint == "tcp://127.0.0.1:*"
    assert parse_kv_events_config('{"enable_kv_cache_events": false}') is None
    cfg = parse_kv_events_config('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "topic": "t"}')
    assert cfg is not None and cfg.endpoint.endswith(":5557") and cfg.topic == "t"
    for bad in ("[1]", "{", '{"publisher": "kafka"}', '{"endpoint": "udp://x"}'):
        with pytest.raises(ValueError):
            parse_kv_events_config(bad)


def _worker(url: str) -> Worker:
    return Worker(WorkerSpec(url, "regular"), CircuitConfig(), None, healthy=True)


def test_cache_aware_prefers_exact_hits_and_falls_back() -> None:
    pol = CacheAwarePolicy(PolicyConfig(cache_threshold=0.3))
    a, b, c = _worker("http://a:1"), _worker("http://b:1"), _worker("http://c:1")
    # exact: b holds 80 of 100 tokens
    assert pol.select([a, b, c], lambda: "hello world", ({"http://a:1": 0, "http://b:1": 80}, 100)) is b
    assert pol.last_reason == "exact_hit"
    # c publishes nothing: its approximate tree (it got this text before) wins over a low exact hit
    pol.tree.insert("some long shared system prompt", c.url, 0.0)
    assert pol.select([a, b, c], lambda: "some long shared system prompt!",
                      ({"http://a:1": 10, "http://b:1": 0}, 100)) is c
    assert pol.last_reason == "cache_hit"
    # an exact hit does not count for a worker through the tree: a's tree entry is ignored once indexed
    pol2 = CacheAwarePolicy(PolicyConfig(cache_threshold=0.3))
    pol2.tree.insert("abcdef", a.url, 0.0)
    assert pol2.select([a, b], lambda: "abcdef", ({"http://a:1": 0, "http://b:1": 0}, 50)).url in (a.url, b.url)
    assert pol2.last_reason == "smallest_tree"


def test_tokenize_body_shapes() -> None:
    assert tokenize_body("/generate", {"input_ids": [1, 2, 3]}) == [1, 2, 3]
    assert tokenize_body("/generate", {"input_ids": [[1], [2]]}) is None  # a batch
    assert tokenize_body("/generate", {"text": "hi"}) == b'{"prompt":"hi"}'
    assert tokenize_body("/v1/completions", {"prompt": [5, 6]}) == [5, 6]
    assert tokenize_body("/v1/completions", {"prompt": ["a", "b"]}) is None
    chat = tokenize_body("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                  "add_generation_prompt": True, "max_tokens": 3})
    assert chat == b'{"messages":[{"role":"user","content":"x"}],"add_generation_prompt":true}'
    assert tokenize_body("/v1/chat/completions", {"messages": [], "tools": [{"type": "function"}]}) is None


def test_pd_decide_threshold_and_queue_limit() -> None:
    import asyncio
    from types import SimpleNamespace

    from pdserve.kv_events import KVSnapshot
    from pdserve.router.config import RouterConfig
    from pdserve.router.metrics import RouterMetrics
    from pdserve.router.pd import PDForwarder
    from pdserve.router.policies import RoundRobinPolicy
    from pdserve.router.workers import WorkerRegistry

    def worker(url: str, role: str) -> Worker:
        return Worker(WorkerSpec(url, role, 9000 if role == "prefill" else None), CircuitConfig(), None, True)

    cfg = RouterConfig(pd=True, pd_local_prefill_threshold=8, pd_prefill_queue_limit=2,
                       workers=(WorkerSpec("http://p:1", "prefill", 9000), WorkerSpec("http://d:1", "decode")))
    index = KVIndex()
    fwd = PDForwarder(cfg, WorkerRegistry(), None, RoundRobinPolicy(), RoundRobinPolicy(),  # type: ignore[arg-type]
                      RouterMetrics(), index)
    d, p = worker("http://d:1", "decode"), worker("http://p:1", "prefill")
    ids = list(range(100, 120))  # 20 tokens = 5 pages of 4

    def decide(prompt: list[int], batch: int | None = None, want_lp: bool = False) -> str:
        ctx = SimpleNamespace(prompt_ids=prompt)
        return asyncio.run(fwd.decide(ctx, d, [p], batch, want_lp))  # type: ignore[arg-type]

    assert decide(ids[:8]) == "local_threshold"  # no index for d: all 8 tokens uncached
    assert decide(ids[:9]) == "remote"
    w = index.workers[d.url] = WorkerIndex()
    chain = chain_hashes(ids, 4)
    w.load(KVSnapshot(seq=1, block_size=4, blocks=[]))
    w.hashes.update(chain[:3])  # 12 tokens cached on the decode
    assert decide(ids) == "local_threshold"  # 20 - 12 = 8
    assert decide(ids + [7]) == "remote"  # 9 uncached
    assert decide(ids, batch=2) == "remote" and decide(ids, want_lp=True) == "remote"
    p.in_flight = 3  # every prefill over the queue limit
    assert decide(ids + [7]) == "local_queue"
    p.in_flight, p.load = 0, 2
    assert decide(ids + [7]) == "remote"  # at the limit is not over it
