"""KV tiers behind the radix cache, on a real KV pool of a tiny model with the KV it computed:
demote -> load back gives the same bytes; greedy output with every write policy (and a device
pool small enough to evict mid-run) equals the run without tiers; a second instance reads a
conversation's prefix from storage (file, and Mooncake Store with a real master) and computes
only the rest; corrupt pages and a dead master cost recomputation, never output; every tier's
`free + cached + in use == total` holds after each step of the way."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.config import HiCacheConfig
from pdserve.engine.kv_tiers.host_pool import SlotAllocator
from pdserve.engine.kv_tiers.manager import TieredKVManager
from pdserve.engine.messages import GenerateReq
from pdserve.engine.kv_tiers.backends import check_backend_config
from pdserve.engine.kv_tiers.tiers import KVTiers, TierConfig, namespace_for
from pdserve.engine.prefix_cache import NO_PAGE, NO_SLOT
from pdserve.engine.request import Request
from pdserve.kv_events import chain_hashes
from tests.mooncake_master import MooncakeMaster

PS = 4
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def with_tiers(llm: LLM, **cfg) -> TieredKVManager:
    """Put a tiered KV manager on an idle engine (what the engine builder will do with the flags)."""
    eng = llm.engine
    cfg.setdefault("host_pages", 64)
    tiers = KVTiers(TierConfig(**cfg), eng.pool.k, eng.pool.v, PS, namespace_for(eng.model_path.name, eng.pool.k, PS))
    kv = TieredKVManager(eng.pool.num_pages, PS, tiers)
    eng.kv = eng.scheduler.kv = kv
    return kv


def tiered_llm(model_dir: Path, num_pages: int = 100, **cfg) -> tuple[LLM, TieredKVManager]:
    llm = LLM(str(model_dir), num_pages=num_pages, page_size=PS, chunk_budget=64, threads=1)
    return llm, with_tiers(llm, **cfg)


def close(llm: LLM) -> None:
    llm.engine.kv.close()  # type: ignore[attr-defined]  (the tiers' threads and store client)
    llm.close()


def turn_one_stored(model_dir: Path, **cfg) -> None:
    """One instance serves a conversation's first turn with write-through to storage, then goes."""
    a, _ = tiered_llm(model_dir, **cfg)
    run(a, [conversation()[0]])
    close(a)


def run_checked(llm: LLM, ps: list[list[int]]) -> list[tuple[list[int], int]]:
    """Like `run`, checking every tier's page accounting after every engine step."""
    eng = llm.engine
    rids = [f"c{len(eng._requests)}-{i}-{random.random()}" for i in range(len(ps))]
    outs: dict[str, tuple[list[int], int]] = {rid: ([], 0) for rid in rids}
    for rid, p in zip(rids, ps):
        eng.add_request(GenerateReq(rid, p, GREEDY))
    # bounded in time, not in steps: a step that waits on a tier's copy thread returns at once, so
    # a count of steps ran out while a loaded machine's copy was still in flight (a flaky failure)
    deadline = time.monotonic() + 120  # a request that can never be admitted fails here, not hangs
    while eng.has_work() and time.monotonic() < deadline:
        step = eng.step()
        for o in step:
            ids, cached = outs[o.rid]
            outs[o.rid] = (ids + list(o.token_ids), o.cached_tokens if o.finish_reason else cached)
        eng.check_integrity()
        if not step:
            time.sleep(0.001)  # leave the core to the copy thread
    assert not eng.has_work(), "the engine made no progress"
    return [outs[rid] for rid in rids]


def run(llm: LLM, ps: list[list[int]]) -> list[tuple[list[int], int]]:
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    if isinstance(llm.engine.kv, TieredKVManager):
        llm.engine.kv.flush()
    llm.engine.check_integrity()  # device and host tiers: nothing leaked
    return [(o.output_ids, o.cached_tokens) for o in outs]


@pytest.fixture(scope="module")
def plain_outputs(tiny_model_dir: Path) -> dict[str, list[list[int]]]:
    """Reference outputs without tiers (a pool large enough that nothing is evicted)."""
    llm = LLM(str(tiny_model_dir), num_pages=400, page_size=PS, chunk_budget=64, threads=1)
    ref = {"batch": [o for o, _ in run(llm, prompts(10, 20, 60, seed=1))],
           "turns": [o for o, _ in run(llm, conversation())]}
    llm.close()
    return ref


def conversation() -> list[list[int]]:
    """Three turns: each prompt extends the one before (a chat's growing context)."""
    base = prompts(1, 40, 40, seed=7)[0]
    return [base, base + prompts(1, 20, 20, seed=8)[0], base + prompts(1, 20, 20, seed=8)[0] + [5, 6, 7, 8, 9]]


def test_slot_allocator_counts_and_refuses_double_free() -> None:
    a = SlotAllocator(3)
    assert a.alloc(5) == [0, 1, 2] and a.num_free == 0
    a.free([1])
    with pytest.raises(AssertionError, match="double free"):
        a.free([1])
    assert a.alloc(1) == [1]


def test_demote_then_load_back_gives_the_same_bytes(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=64, page_size=PS, chunk_budget=64, threads=1)
    kv = with_tiers(llm, write_policy="write_back")
    pool = llm.engine.pool
    prompt = prompts(1, 41, 41, seed=3)[0]
    first = run(llm, [prompt])
    pages, _ = kv.cache.match(prompt)
    assert len(pages) == 10  # 40 of 41 tokens in full pages, computed by the model
    before = [(pool.k[:, p * PS:(p + 1) * PS].clone(), pool.v[:, p * PS:(p + 1) * PS].clone()) for p in pages]
    cached = kv.cache.num_pages  # the prompt's 10 pages and 2 of the reply's
    assert cached == 12 and kv.cache.evict(cached) == cached  # the device tier evicts: demoted, not dropped
    nodes = list(kv.cache.nodes())
    assert all(n.page == NO_PAGE and n.host != NO_SLOT for n in nodes) and kv.cache.num_pages == 0
    assert kv.tiers.counters.demoted == 12 and kv.cache.num_host == 12
    pool.k.zero_()  # the device copy is gone for sure
    pool.v.zero_()
    r = Request(rid="r", prompt_len=len(prompt), params=GREEDY, tokens=list(prompt))
    assert not kv.prepare(r)  # its prefix is being loaded back: not admitted yet
    kv.flush()
    assert kv.prepare(r)
    kv.attach_prefix(r)
    assert r.num_computed == 40 and kv.tiers.counters.loaded == 10
    for p, (k, v) in zip(r.pages, before):
        assert torch.equal(pool.k[:, p * PS:(p + 1) * PS], k) and torch.equal(pool.v[:, p * PS:(p + 1) * PS], v)
    kv.release(r)
    kv.check_integrity([])
    assert run(llm, [prompt]) == [(first[0][0], 40)]  # generation from loaded pages: same output
    close(llm)


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_small_pool_with_tiers_keeps_greedy_output(tiny_model_dir: Path, tmp_path: Path, policy: str,
                                                   plain_outputs: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=40, page_size=PS, chunk_budget=64, threads=1, decode_headroom=0.0)
    kv = with_tiers(llm, host_pages=24, write_policy=policy, storage_backend="file",
                    storage_extra=json.dumps({"path": str(tmp_path)}), prefetch_policy="wait_complete")
    batch = prompts(10, 20, 60, seed=1)  # 10 x 20..60 tokens through a 39-page pool: it evicts mid-run
    assert [o for o, _ in run_checked(llm, batch)] == plain_outputs["batch"]
    turns = [run_checked(llm, [p])[0] for p in conversation()]
    assert [o for o, _ in turns] == plain_outputs["turns"]
    assert turns[1][1] >= 40 and turns[2][1] >= 60  # each turn found the previous one in some tier
    again = run_checked(llm, batch)  # asked again: their pages are in host or storage by now
    assert [o for o, _ in again] == plain_outputs["batch"] and sum(c for _, c in again) > 0
    kv.flush()
    llm.engine.check_integrity()
    c, store = kv.tiers.counters, kv.tiers.store
    assert store is not None and c.demoted + c.backed_up > 0 and c.loaded > 0 and c.host_evicted > 0
    if policy != "write_through_selective":  # (selective writes only pages hit twice: maybe none here)
        assert store.counters.pages_written > 0
    if policy == "write_through":
        assert c.backed_up > 0
    close(llm)


def test_a_second_instance_reads_the_prefix_from_file_storage(tiny_model_dir: Path, tmp_path: Path,
                                                              plain_outputs: dict[str, list[list[int]]]) -> None:
    extra = json.dumps({"path": str(tmp_path)})
    turn_one_stored(tiny_model_dir, storage_backend="file", storage_extra=extra)
    b, kv = tiered_llm(tiny_model_dir, storage_backend="file", storage_extra=extra, prefetch_policy="wait_complete")
    computed = b.engine.stats.prompt_tokens
    out = run(b, [conversation()[1]])
    assert out == [(plain_outputs["turns"][1], 40)]  # turn 1's 40 tokens came from storage
    assert b.engine.stats.prompt_tokens - computed == 20  # only the new message was computed
    assert kv.tiers.counters.fetched == 10 and kv.tiers.store is not None
    assert kv.tiers.store.counters.pages_read == 10
    close(b)


def test_best_effort_never_waits_and_the_fetch_serves_the_next_request(
        tiny_model_dir: Path, tmp_path: Path, plain_outputs: dict[str, list[list[int]]]) -> None:
    extra = json.dumps({"path": str(tmp_path)})
    turn_one_stored(tiny_model_dir, storage_backend="file", storage_extra=extra)
    b, kv = tiered_llm(tiny_model_dir, storage_backend="file", storage_extra=extra, prefetch_policy="best_effort")
    assert run_checked(b, [conversation()[1]]) == [(plain_outputs["turns"][1], 0)]  # ran at once, computed
    kv.flush()
    assert kv.tiers.counters.fetched == 10  # the fetch went on meanwhile
    assert run_checked(b, [conversation()[0] + [9, 9, 9, 9, 9]])[0][1] == 40
    close(b)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_bad_pages_in_storage_are_misses_and_recomputed(tiny_model_dir: Path, tmp_path: Path, damage: str,
                                                        plain_outputs: dict[str, list[list[int]]]) -> None:
    extra = json.dumps({"path": str(tmp_path)})
    turn_one_stored(tiny_model_dir, storage_backend="file", storage_extra=extra)
    assert len(list(tmp_path.glob("*/pdkv-*"))) == 12  # turn 1's prompt (10 pages) and reply (2)
    key = namespace_for(tiny_model_dir.name, torch.zeros(2, 4, 2, 16), PS).key(chain_hashes(conversation()[0], PS)[3])
    fourth = tmp_path / key[-2:] / key
    blob = bytearray(fourth.read_bytes())
    if damage == "corrupt":
        blob[len(blob) // 2] ^= 0x55
        fourth.write_bytes(bytes(blob))
    elif damage == "truncated":
        fourth.write_bytes(bytes(blob[:len(blob) - 100]))
    else:
        fourth.unlink()
    # through the engine builder, as `pdserve serve --enable-hierarchical-cache ...` makes it
    h = HiCacheConfig(enable=True, storage_backend="file", storage_extra=extra, prefetch_policy="wait_complete")
    b = LLM(str(tiny_model_dir), num_pages=100, page_size=PS, chunk_budget=64, threads=1, hicache=h)
    kv = b.engine.kv
    assert isinstance(kv, TieredKVManager)
    assert run(b, [conversation()[1]]) == [(plain_outputs["turns"][1], 12)]  # pages 0..2 only, output equal
    bad = {"corrupt": {"checksum": 1}, "truncated": {"truncated": 1}, "missing": {}}[damage]
    assert kv.tiers.store is not None and kv.tiers.store.counters.bad_pages == bad
    assert kv.tiers.store.counters.pages_read == 3
    close(b)


def test_mooncake_store_shared_by_two_instances_and_a_dead_master(tiny_model_dir: Path,
                                                                   plain_outputs: dict[str, list[list[int]]]) -> None:
    master = MooncakeMaster.start()
    extra = json.dumps({"master_server_address": master.address, "local_hostname": "127.0.0.1",
                        "global_segment_size": "32mb", "local_buffer_size": "16mb"})
    a = b = None
    try:
        a, _ = tiered_llm(tiny_model_dir, storage_backend="mooncake", storage_extra=extra)
        run(a, [conversation()[0]])  # a keeps serving: its segment holds the pages
        b, kv = tiered_llm(tiny_model_dir, storage_backend="mooncake", storage_extra=extra,
                           prefetch_policy="timeout", prefetch_timeout_s=1.0, storage_retry_s=60.0)
        assert run(b, [conversation()[1]]) == [(plain_outputs["turns"][1], 40)]  # a healthy store answers in time
        assert kv.tiers.store is not None and kv.tiers.store.counters.pages_read == 10
        master.kill()
        t0 = time.monotonic()
        assert run_checked(b, [conversation()[2]])[0][0] == plain_outputs["turns"][2]  # computed; nothing fails
        assert time.monotonic() - t0 < 4.0  # it waited 1 s for the dead master's lookup (~4.5 s), not more
        kv.flush()
        assert kv.tiers.store.counters.outages == 1
        kv.cache.reset()
        assert run(b, [conversation()[1]]) == [(plain_outputs["turns"][1], 0)]  # nothing anywhere: recomputed
    finally:
        for llm in (a, b):
            if llm is not None:
                close(llm)
        master.stop()


def test_tier_config_refuses_what_cannot_work() -> None:
    for bad, match in [(dict(host_pages=0), "at least 1 page"), (dict(write_policy="write_around"), "write-policy"),
                       (dict(prefetch_policy="eager"), "prefetch-policy"), (dict(storage_backend="s3"), "backend"),
                       ]:
        with pytest.raises(ValueError, match=match):
            TierConfig(**{"host_pages": 4, **bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON"):
        check_backend_config("file", "{path:")
    with pytest.raises(ValueError, match="needs"):
        k = torch.zeros(1, 8, 1, 2)
        KVTiers(TierConfig(host_pages=4, storage_backend="file"), k, k.clone(), 2, namespace_for("m", k, 2))


def test_kv_events_name_the_tier_and_a_router_index_follows_them(tmp_path: Path) -> None:
    """Every page entering or leaving a tier is an event naming it (vLLM's `medium`): demotion is a
    removal from the device and a store in host, leaving the last tier a removal from every tier;
    a router's index that applies them holds what each tier holds; pages fetched from storage
    are stored again under the right parent; a page written to storage goes to the store's index."""
    from pdserve.engine.kv_event_log import KVEventLog
    from pdserve.kv_events import MEDIUM_DISK, MEDIUM_HOST, BlockStored, KVEventBatch
    from pdserve.router.kv_index import StoreIndex, WorkerIndex

    k, v = torch.zeros(1, 8 * 2, 1, 2), torch.zeros(1, 8 * 2, 1, 2)
    tiers = KVTiers(TierConfig(host_pages=2, write_policy="write_back", storage_backend="file",
                               storage_extra=json.dumps({"path": str(tmp_path)}), prefetch_policy="wait_complete"),
                    k, v, 2, namespace_for("m", k, 2))
    kv = TieredKVManager(8, 2, tiers)
    log = KVEventLog(kv.cache)
    log.attach()
    store = StoreIndex()
    idx = WorkerIndex(store)
    idx.load(log.snapshot(0))

    def follow() -> list:
        events = log.take()
        assert idx.apply(idx.seq + 1, KVEventBatch(ts=time.time(), events=events))
        snap = WorkerIndex(StoreIndex())
        snap.load(log.snapshot(idx.seq))  # a resync sees what the events built
        assert (snap.hashes, snap.host) == (idx.hashes, idx.host)
        return events

    toks = [1, 2, 3, 4, 5, 6, 7]
    r = Request(rid="a", prompt_len=7, params=GREEDY, tokens=list(toks))
    assert kv.prepare(r) is False  # asks storage first (nothing there)
    kv.flush()
    assert kv.prepare(r)
    kv.attach_prefix(r)
    assert kv.ensure_pages(r, 7)
    r.num_computed = 7
    kv.release(r)
    h = chain_hashes(toks, 2)
    assert [type(e) for e in follow()] == [BlockStored] and idx.hashes == set(h) and not idx.host
    assert kv.cache.evict(3) == 3  # all demoted; 2 host slots, so the deepest page went on to storage
    assert kv.tiers.counters.demoted == 3 and kv.tiers.counters.host_evicted == 1
    follow()
    assert idx.hashes == set() and idx.host == {h[0], h[1]}  # h[2] left the instance (to storage)
    kv.flush()
    assert kv.tiers.counters.stored == 1
    r2 = Request(rid="b", prompt_len=7, params=GREEDY, tokens=list(toks))
    while not kv.prepare(r2):
        kv.flush()
    kv.attach_prefix(r2)
    assert r2.num_computed == 6  # all three pages: two from host, one back from storage
    r2.admitted = True
    assert kv.tiers.counters.hit_tokens == {"device": 0, "host": 0, "storage": 0}  # counted at release
    back = [e for e in follow() if isinstance(e, BlockStored) and e.medium == MEDIUM_HOST]
    assert back == [BlockStored(block_hashes=[h[2]], parent_block_hash=h[1], token_ids=[5, 6], block_size=2,
                                medium=MEDIUM_HOST)]
    assert idx.hashes == set(h) and idx.host == {h[1], h[2]}  # h[0]'s host copy made room for the fetch
    kv.release(r2)
    assert kv.tiers.counters.hit_tokens == {"device": 0, "host": 4, "storage": 2}
    kv.cache._backup(kv.cache.path(toks), store=True)  # what a PD decode does with a finished request
    kv.flush()
    assert [e.medium for e in follow() if isinstance(e, BlockStored)][-1] == MEDIUM_DISK
    assert all(x in store for x in h)  # the whole chain is in the file store now: any worker may fetch it
    kv.check_integrity([])
    kv.close()


def test_a_role_switch_turns_the_decode_write_back_on_and_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A live role switch (Engine.switch_stage -> kv.set_role) decides whether finished requests'
    pages go to storage: a prefill under write_back writes nothing on its own, a decode writes all."""
    llm, kv = tiered_llm(tiny_model_dir, write_policy="write_back", storage_backend="file",
                         storage_extra=json.dumps({"path": str(tmp_path)}))
    assert kv.tiers.store is not None
    run(llm, [conversation()[0]])
    assert kv.tiers.store.counters.pages_written == 0  # nothing evicted, not a decode: nothing written
    kv.set_role(True)
    run(llm, [prompts(1, 40, 40, seed=11)[0]])
    assert kv.tiers.store.counters.pages_written >= 10  # the finished request's prompt and reply
    kv.set_role(False)
    written = kv.tiers.store.counters.pages_written
    run(llm, [prompts(1, 40, 40, seed=12)[0]])
    assert kv.tiers.store.counters.pages_written == written
    close(llm)
