"""PD at the engine level: a prefill Engine and a decode Engine in this process, stepped in
turn, moving real KV pages through each transfer backend. Fast (tiny model), exact."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import Bootstrap, GenerateReq, TokenOut
from pdserve.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)


def engine_cfg(folder: Path, **kw) -> EngineConfig:
    base = dict(model=str(folder), num_pages=200, page_size=4, chunk_budget=24, threads=1)
    return EngineConfig(**{**base, **kw})


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(3, 70))] for _ in range(n)]


def run_until_done(engines: list[Engine], rids: set[str], timeout: float = 60.0) -> dict[str, list[TokenOut]]:
    outs: dict[str, list[TokenOut]] = {}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while done != rids:
        assert time.monotonic() < deadline, f"stuck: {rids - done}"
        for e in engines:
            for o in e.step():
                outs.setdefault(o.rid, []).append(o)
                if o.finished:
                    done.add(o.rid)
        time.sleep(0.001)
    return outs


def run_pd(pre: Engine, dec: Engine, prompts: list[list[int]], params: SamplingParams, room0: int,
           timeout: float = 60.0) -> dict[str, list[TokenOut]]:
    """Prompt i as one PD request (room room0 + i; rids p{i} / d{i}) on both engines, stepped
    until every request ended."""
    port = pre.stage.bootstrap_server.port
    rids = set()
    for i, p in enumerate(prompts):
        boot = Bootstrap("127.0.0.1", port, room=room0 + i)
        pre.add_request(GenerateReq(f"p{i}", p, params, bootstrap=boot))
        dec.add_request(GenerateReq(f"d{i}", p, params, bootstrap=boot))
        rids |= {f"p{i}", f"d{i}"}
    return run_until_done([pre, dec], rids, timeout)


def tokens(outs: list[TokenOut]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.fixture(scope="module")
def unified(tiny_model_dir: Path) -> Engine:
    return Engine.build(engine_cfg(tiny_model_dir))


@pytest.mark.parametrize("backend", ["tcp", "shm", "nixl", "mooncake"])
def test_pd_equals_unified_and_kv_bytes_match(backend: str, tiny_model_dir: Path, unified: Engine) -> None:
    base = DisaggConfig(backend=backend, bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(tiny_model_dir, num_pages=150), DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    try:
        ps = prompts(12)
        for i, p in enumerate(ps):
            unified.add_request(GenerateReq(f"u{i}", p, PARAMS))
        ref = run_until_done([unified], {f"u{i}" for i in range(len(ps))})
        got = run_pd(pre, dec, ps, PARAMS, 1000)
        for i in range(len(ps)):
            assert [o.error for o in got[f"d{i}"]] == [None] * len(got[f"d{i}"])
            assert tokens(got[f"p{i}"]) == tokens(ref[f"u{i}"])[:1]  # prefill answers one token
            assert tokens(got[f"d{i}"]) == tokens(ref[f"u{i}"])
            lp = [x for o in got[f"d{i}"] for x in (o.logprobs or [])]
            ref_lp = [x for o in ref[f"u{i}"] for x in (o.logprobs or [])]
            assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-5
        pre.check_integrity()
        dec.check_integrity()
        assert pre.load().num_running == dec.load().num_running == 0
        for side in (pre, dec):  # what /metrics reports
            stats = side.load().transfer
            assert stats is not None and (stats.success, stats.failed) == (len(ps), 0)
            assert stats.bytes >= sum(len(p) for p in ps) * pre.pool.page_bytes() // 4 and stats.latency_sum_s > 0
    finally:
        pre.close()
        dec.close()


def test_decode_kv_bytes_equal_prefill_pages(tiny_model_dir: Path) -> None:
    """After a transfer (before decode writes more), decode's pages hold the prefill's bytes."""
    cfg = DisaggConfig(backend="tcp", bootstrap_port=0)
    pre = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**cfg.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**cfg.__dict__, "mode": "decode"}))
    try:
        p = prompts(1, seed=3)[0] * 2
        boot = Bootstrap("127.0.0.1", pre.stage.bootstrap_server.port, room=77)
        one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        pre.add_request(GenerateReq("p", p, one, bootstrap=boot))
        dec.add_request(GenerateReq("d", p, one, bootstrap=boot))
        seen: dict[str, list[int]] = {}
        orig_commit = dec.stage._commit

        def spy(req, rec):  # capture both page tables at the moment decode commits
            seen["dec"] = list(req.pages)
            seen["pre"] = list(pre._requests["p"].pages) if "p" in pre._requests else seen.get("pre_pages", [])
            return orig_commit(req, rec)

        orig_after = pre.stage.after_forward

        def spy_after(chunks):
            for c in chunks:
                seen["pre_pages"] = list(c.req.pages)
            return orig_after(chunks)

        dec.stage._commit = spy
        pre.stage.after_forward = spy_after
        run_until_done([pre, dec], {"p", "d"})
        n = -(-len(p) // 4)
        ps = 4
        for layer in range(pre.pool.k.shape[0]):
            for sp, dp in zip(seen["pre_pages"][:n], seen["dec"][:n]):
                for t in (("k"), ("v")):
                    a = getattr(pre.pool, t)[layer, sp * ps:(sp + 1) * ps]
                    b = getattr(dec.pool, t)[layer, dp * ps:(dp + 1) * ps]
                    rows = min(ps, len(p) - (seen["pre_pages"].index(sp)) * ps)
                    assert torch.equal(a[:rows], b[:rows])
    finally:
        pre.close()
        dec.close()


def test_n_copies_share_prefill_pages_and_seeded_pd_equals_unified(tiny_model_dir: Path) -> None:
    """n > 1 in PD: one room per copy; the prefill computes each prompt once (copies wait for the
    leader's pages, then compute the last partial page) and every seeded sampled stream equals
    the unified engine's token for token (the decode skips the draw the prefill made)."""
    base = DisaggConfig(backend="tcp", bootstrap_port=0, heartbeat_interval=0.5)
    uni = Engine.build(engine_cfg(tiny_model_dir))
    pre = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(tiny_model_dir, num_pages=150), DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    n, ps = 4, [p + [7] * 20 for p in prompts(2, seed=5)]  # >= 23 tokens: several full pages to share
    try:
        port = pre.stage.bootstrap_server.port
        subs = [(f"{i}-{j}", p, SamplingParams(max_new_tokens=6, temperature=0.9, seed=11 + j, ignore_eos=True))
                for i, p in enumerate(ps) for j in range(n)]
        for rid, p, sp in subs:
            lead = None if rid.endswith("-0") else rid.split("-")[0] + "-0"
            uni.add_request(GenerateReq(f"u{rid}", p, sp, share_prompt_with=lead and f"u{lead}"))
        ref = run_until_done([uni], {f"u{rid}" for rid, _, _ in subs})
        for k, (rid, p, sp) in enumerate(subs):
            lead = None if rid.endswith("-0") else rid.split("-")[0] + "-0"
            boot = Bootstrap("127.0.0.1", port, room=5000 + k)
            pre.add_request(GenerateReq(f"p{rid}", p, sp, bootstrap=boot, share_prompt_with=lead and f"p{lead}"))
            dec.add_request(GenerateReq(f"d{rid}", p, sp, bootstrap=boot))
        got = run_until_done([pre, dec], {f"{s}{rid}" for rid, _, _ in subs for s in "pd"})
        for rid, _, _ in subs:
            assert [o.error for o in got[f"d{rid}"]] == [None] * len(got[f"d{rid}"])
            assert tokens(got[f"d{rid}"]) == tokens(ref[f"u{rid}"]), rid
        streams = {tuple(tokens(ref[f"u{rid}"])) for rid, _, _ in subs}
        assert len(streams) > len(ps)  # the seeds make the copies differ: a real sampled comparison
        # each prompt computed once; each other copy at most one page (plus its last token)
        assert pre.num_forward_tokens <= sum(len(p) for p in ps) + len(ps) * (n - 1) * 4
        assert uni.num_forward_tokens <= sum(len(p) + 6 for p in ps) * n - sum(len(p) - 4 for p in ps) * (n - 1)
        for e in (uni, pre, dec):
            e.check_integrity()
    finally:
        pre.close()
        dec.close()


def test_failed_transfers_are_recomputed(tiny_model_dir: Path, unified: Engine) -> None:
    """Policy recompute (the default): a rejected record and an injected transfer failure both
    end in the decode running the prompt itself: output equal to unified, counted, pages back."""
    import msgspec

    ps = prompts(6, seed=21)
    for i, p in enumerate(ps):
        unified.add_request(GenerateReq(f"r{i}", p, PARAMS))
    ref = run_until_done([unified], {f"r{i}" for i in range(len(ps))})
    cfg = DisaggConfig(backend="tcp", bootstrap_port=0, heartbeat_interval=0.5, fail_rate=0.3)
    pre = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**cfg.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(tiny_model_dir), DisaggConfig(**{**cfg.__dict__, "mode": "decode", "fail_rate": 0.0}))
    marks = [e.load().free_pages + e.load().cached_pages for e in (pre, dec)]
    make_receiver = dec.stage.manager.open

    def receiver(room: int, sources: list):  # room 3000 gets another room's record: rejected
        r = make_receiver(room, sources)
        if room == 3000:
            real = r.metadata
            r.metadata = lambda: (lambda rec: None if rec is None else msgspec.structs.replace(rec, room=1))(real())
        return r

    dec.stage.manager.open = receiver
    try:
        got = run_pd(pre, dec, ps, PARAMS, 3000)
        for i in range(len(ps)):
            assert [o.error for o in got[f"d{i}"]] == [None] * len(got[f"d{i}"])  # no client error
            assert tokens(got[f"d{i}"]) == tokens(ref[f"r{i}"])
        stats = dec.load().transfer
        # room 3000's transfer succeeded but its record was rejected; injected failures failed theirs
        assert stats is not None and stats.recomputed >= max(2, stats.failed), stats
        for e, mark in zip((pre, dec), marks):
            assert not e.has_work()
            e.check_integrity()
            assert e.load().free_pages + e.load().cached_pages == mark
    finally:
        pre.close()
        dec.close()


def test_resumed_output_continues_token_for_token(unified: Engine) -> None:
    """A migrated stream: prompt + the ids already delivered, counted as output; the rest equals
    the uninterrupted run and the counters count every token once."""
    p = prompts(1, seed=31)[0]
    unified.add_request(GenerateReq("whole", p, PARAMS))
    whole = tokens(run_until_done([unified], {"whole"})["whole"])
    cut = len(whole) // 2
    unified.add_request(GenerateReq("rest", p, PARAMS, output_ids=whole[:cut]))
    outs = run_until_done([unified], {"rest"})["rest"]
    assert tokens(outs) == whole[cut:]
    assert outs[-1].completion_tokens == len(whole) and outs[-1].prompt_tokens == len(p)
