"""Decode-side prefix cache (--disaggregation-decode-enable-radix-cache) at the engine level: a
prefill Engine and a decode Engine in this process over a real transfer backend, multi-turn
conversations with a shared system prompt. Greedy output equals a unified engine's; each turn
moves exactly the prompt pages past the decode's hit (transfer byte counters, both sides);
cached_tokens counts each cached prompt token once; pools come back whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.engine import Engine
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.messages import Bootstrap, GenerateReq
from pdserve.engine.sampling_params import SamplingParams
from tests.integration.test_pd_engines import engine_cfg, run_until_done, tokens

PS = 4  # page_size of engine_cfg
NEW = 6  # output tokens per turn
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


def pd_pair(folder: Path, backend: str, dec_pages: int = 200, prefill_tp: int = 1, decode_tp: int = 1,
            **kw) -> tuple[Engine, Engine]:
    base = dict(backend=backend, bootstrap_port=0, heartbeat_interval=0.5, **kw)
    pre = Engine.build(engine_cfg(folder, tp_size=prefill_tp), DisaggConfig(**{**base, "mode": "prefill"}))
    try:
        dec = Engine.build(engine_cfg(folder, num_pages=dec_pages, tp_size=decode_tp),
                     DisaggConfig(**{**base, "mode": "decode", "fail_rate": 0.0, "decode_enable_radix_cache": True}))
    except BaseException:
        pre.close()
        raise
    return pre, dec


class Conversation:
    """A chat as token ids: a shared system prompt, then (user turn, model answer) pairs."""

    def __init__(self, system: list[int], seed: int) -> None:
        self.rng = random.Random(seed)
        self.history = list(system)

    def next_prompt(self) -> list[int]:
        return self.history + [self.rng.randrange(3, 49000) for _ in range(self.rng.randint(3, 9))]

    def answered(self, prompt: list[int], answer: list[int]) -> None:
        self.history = prompt + answer


def cached_hit(cached: list[list[int]], prompt: list[int], limit: int) -> int:
    """Tokens of the longest full-page prefix of prompt[:limit] that a cached sequence starts with."""
    best = 0
    for seq in cached:
        n = 0
        while n + PS <= min(limit, len(seq)) and seq[n:n + PS] == prompt[n:n + PS]:
            n += PS
        best = max(best, n)
    return best


def turn(pre: Engine, dec: Engine, rid: str, prompt: list[int], room: int) -> tuple[list, list]:
    boot = Bootstrap("127.0.0.1", pre.stage.bootstrap_server.port, room=room)
    pre.add_request(GenerateReq(f"p{rid}", prompt, PARAMS, bootstrap=boot))
    dec.add_request(GenerateReq(f"d{rid}", prompt, PARAMS, bootstrap=boot))
    got = run_until_done([pre, dec], {f"p{rid}", f"d{rid}"})
    assert [o.error for o in got[f"d{rid}"]] == [None] * len(got[f"d{rid}"])
    return got[f"p{rid}"], got[f"d{rid}"]


def unified_answer(uni: Engine, rid: str, prompt: list[int]) -> list[int]:
    uni.add_request(GenerateReq(rid, prompt, PARAMS))
    return tokens(run_until_done([uni], {rid})[rid])


def assert_pools_whole(*engines: Engine) -> None:
    """Nothing private left, and every page free once the caches are flushed (the start mark)."""
    for e in engines:
        assert not e.has_work()
        e.check_integrity()
        assert e.flush_cache()
        assert e.load().free_pages == e.load().num_pages


@pytest.fixture(scope="module")
def uni(tiny_model_dir: Path) -> Engine:
    return Engine.build(engine_cfg(tiny_model_dir))


CASES = [("tcp", 1, 1), ("shm", 1, 1), ("nixl", 1, 1), ("mooncake", 1, 1), ("tcp", 1, 2), ("nixl", 2, 1)]


@pytest.mark.parametrize("backend,prefill_tp,decode_tp", CASES)
def test_multi_turn_equals_unified_and_moves_only_uncached_pages(backend: str, prefill_tp: int, decode_tp: int,
                                                                 tiny_model_dir: Path, uni: Engine) -> None:
    """Tensor parallelism: (1, 2) splits each page's heads over two decode ranks (both get the
    prefix), (2, 1) merges two prefill ranks' head slices (both skip it)."""
    pre, dec = pd_pair(tiny_model_dir, backend, prefill_tp=prefill_tp, decode_tp=decode_tp)
    page_bytes = uni.pool.page_bytes()  # the whole model's page: the stats count every rank's heads
    system = [random.Random(7).randrange(3, 49000) for _ in range(21)]
    convs = [Conversation(system, seed) for seed in (1, 2)]
    dec_cached: list[list[int]] = []  # what the decode's cache holds (no eviction in this pool)
    room = 1 + 100 * CASES.index((backend, prefill_tp, decode_tp))
    beats_prefill = 0
    try:
        for k in range(4):
            for c, conv in enumerate(convs):
                prompt = conv.next_prompt()
                ref = unified_answer(uni, f"u{room}", prompt)
                hit = cached_hit(dec_cached, prompt, len(prompt))
                before = [e.load().transfer.bytes for e in (pre, dec)]
                p_out, d_out = turn(pre, dec, f"{k}{c}", prompt, room)
                room += 1
                assert tokens(d_out) == ref, (backend, k, c)
                moved = (pages_needed(len(prompt), PS) - hit // PS) * page_bytes
                assert [e.load().transfer.bytes - b for e, b in zip((pre, dec), before)] == [moved] * 2
                pre_hit = p_out[-1].cached_tokens
                assert d_out[-1].cached_tokens == max(pre_hit, hit)
                assert k == 0 and c == 0 or hit >= len(system) // PS * PS  # the system prompt at least
                beats_prefill += hit > pre_hit
                conv.answered(prompt, ref)
                dec_cached.append((prompt + ref)[: (len(prompt) + NEW - 1) // PS * PS])
        assert beats_prefill >= 6  # the decode also caches the answers: a longer hit than the prefill's
        # a full hit: every page of a page-aligned prompt is cached; no page moves, the Done still comes
        prompt = convs[0].history[: (len(convs[0].history) - 1) // PS * PS]
        before = [e.load().transfer.bytes for e in (pre, dec)]
        _, d_out = turn(pre, dec, "full", prompt, room)
        assert tokens(d_out) == unified_answer(uni, f"u{room}", prompt)
        assert [e.load().transfer.bytes for e in (pre, dec)] == before
        assert d_out[-1].cached_tokens == len(prompt)
        for e in (pre, dec):
            assert e.load().transfer.success == 9 and e.load().transfer.failed == 0
        assert_pools_whole(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_decode_cache_evictions_and_recompute(tiny_model_dir: Path, uni: Engine) -> None:
    """A decode pool too small for the conversations' caches (evictions every turn) and injected
    transfer failures (recompute): output still equals unified, pages all come back."""
    pre, dec = pd_pair(tiny_model_dir, "tcp", dec_pages=40, fail_rate=0.25)
    evicted = []
    evict = dec.kv.cache.evict

    def counting(n: int) -> int:
        evicted.append(evict(n))
        return evicted[-1]

    dec.kv.cache.evict = counting  # type: ignore[method-assign]
    failed_hits: list[int] = []  # the decode's cached prefix of each request whose transfer failed
    failed = dec.stage._failed

    def spy(req, error, out):
        failed_hits.append(req.transfer.decode_prefix_len)
        return failed(req, error, out)

    dec.stage._failed = spy  # type: ignore[method-assign]
    system = [random.Random(9).randrange(3, 49000) for _ in range(17)]
    convs = [Conversation(system, seed) for seed in (11, 12, 13)]
    room = 7000
    try:
        for k in range(4):
            prompts = [conv.next_prompt() for conv in convs]
            refs = [unified_answer(uni, f"ev{k}{c}", p) for c, p in enumerate(prompts)]
            port = pre.stage.bootstrap_server.port
            for c, p in enumerate(prompts):  # the three turns at once: they compete for pages
                boot = Bootstrap("127.0.0.1", port, room=room + c)
                pre.add_request(GenerateReq(f"p{k}{c}", p, PARAMS, bootstrap=boot))
                dec.add_request(GenerateReq(f"d{k}{c}", p, PARAMS, bootstrap=boot))
            room += len(convs)
            got = run_until_done([pre, dec], {f"{s}{k}{c}" for c in range(len(convs)) for s in "pd"})
            for c, (conv, p, ref) in enumerate(zip(convs, prompts, refs)):
                assert [o.error for o in got[f"d{k}{c}"]] == [None] * len(got[f"d{k}{c}"])
                assert tokens(got[f"d{k}{c}"]) == ref, (k, c)
                conv.answered(p, ref)
            dec.check_integrity()
        stats = dec.load().transfer
        assert sum(evicted) > 0, "the small pool never evicted: the test lost its point"
        assert stats.recomputed >= 1 and stats.success >= 1, stats
        assert any(failed_hits), f"no failed transfer had a decode prefix: {failed_hits}"
        assert_pools_whole(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_plain_pd_reports_the_prefills_hit_and_moves_every_page(tiny_model_dir: Path, uni: Engine) -> None:
    """Without the flag nothing changes: every prompt page moves, cached_tokens is the prefill's hit."""
    base = dict(backend="tcp", bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**base, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**base, "mode": "decode"}))
    conv = Conversation([random.Random(5).randrange(3, 49000) for _ in range(13)], 3)
    prev = 0
    try:
        for k in range(2):
            prompt = conv.next_prompt()
            ref = unified_answer(uni, f"plain{k}", prompt)
            before = [e.load().transfer.bytes for e in (pre, dec)]
            p_out, d_out = turn(pre, dec, f"plain{k}", prompt, 9000 + k)
            assert tokens(d_out) == ref
            moved = pages_needed(len(prompt), PS) * uni.pool.page_bytes()
            assert [e.load().transfer.bytes - b for e, b in zip((pre, dec), before)] == [moved] * 2
            prefill_hit = 0 if k == 0 else prev // PS * PS  # its cache holds the last turn's prompt
            assert d_out[-1].cached_tokens == p_out[-1].cached_tokens == prefill_hit
            conv.answered(prompt, ref)
            prev = len(prompt)
        assert_pools_whole(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_flag_only_on_decode() -> None:
    with pytest.raises(ValueError, match="decode"):
        DisaggConfig(mode="prefill", decode_enable_radix_cache=True)
