"""PD of an MLA model at the engine level (a prefill and a decode Engine in this process, stepped
in turn): the latent pool (one tensor, one "head" of the latent's width: K only) moves through
each transfer backend, and the decode equals the unified engine; the decode's pages hold the
prefill's latent bytes, and the bytes moved per page are the latent's, not K and V's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.engine import Engine
from pdserve.engine.kv_cache import LatentPool
from pdserve.engine.messages import GenerateReq
from tests.integration.test_pd_engines import PARAMS, engine_cfg, prompts, run_pd, run_until_done, tokens


@pytest.fixture(scope="module")
def v3(moe_dir) -> Path:
    return moe_dir("deepseek_v3")


@pytest.fixture(scope="module")
def reference(v3: Path) -> dict[str, list[int]]:
    unified = Engine.build(engine_cfg(v3))
    ps = prompts(6, seed=4)
    for i, p in enumerate(ps):
        unified.add_request(GenerateReq(f"u{i}", p, PARAMS))
    ref = run_until_done([unified], {f"u{i}" for i in range(len(ps))})
    unified.close()
    return {f"u{i}": tokens(ref[f"u{i}"]) for i in range(len(ps))}


@pytest.mark.parametrize("backend", ["tcp", "shm", "mooncake"])
def test_latent_pd_equals_unified(backend: str, v3: Path, reference: dict[str, list[int]]) -> None:
    if backend == "mooncake":
        pytest.importorskip("mooncake.engine")
    base = DisaggConfig(backend=backend, bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(engine_cfg(v3), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(v3, num_pages=150), DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    try:
        assert isinstance(pre.pool, LatentPool) and isinstance(dec.pool, LatentPool)
        layout = pre.stage.manager.layout
        assert (layout.tensors, layout.kv_heads, layout.page_bytes) == (1, 1, pre.pool.page_bytes())
        ps = prompts(6, seed=4)
        got = run_pd(pre, dec, ps, PARAMS, 3000)
        for i in range(len(ps)):
            assert [o.error for o in got[f"d{i}"]] == [None] * len(got[f"d{i}"])
            assert tokens(got[f"d{i}"]) == reference[f"u{i}"]
        pre.check_integrity()
        dec.check_integrity()
        stats = dec.load().transfer
        assert stats is not None and (stats.success, stats.failed) == (len(ps), 0)
        full = sum(len(p) // 4 for p in ps)  # whole pages at least; every one a latent page
        assert full * pre.pool.page_bytes() <= stats.bytes <= sum(-(-len(p) // 4) for p in ps) * pre.pool.page_bytes()
    finally:
        pre.close()
        dec.close()


def test_latent_pd_from_prefill_tp_2_equals_unified(v3: Path, reference: dict[str, list[int]]) -> None:
    """Every TP rank holds the whole latent: the decode (tp 1) takes each page from prefill rank 0,
    rank 1 sends only Done. (Decode tp 2 / DP attention: test_moe_servers.py; the links of every
    pairing: the test below.)"""
    base = DisaggConfig(backend="tcp", bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(engine_cfg(v3, tp_size=2), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    try:
        dec = Engine.build(engine_cfg(v3, num_pages=150),
                           DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    except BaseException:
        pre.close()
        raise
    try:
        ps = prompts(6, seed=4)
        got = run_pd(pre, dec, ps, PARAMS, 6000, timeout=120)
        for i in range(len(ps)):
            assert [o.error for o in got[f"d{i}"] if o.error] == []
            assert tokens(got[f"d{i}"]) == reference[f"u{i}"], i
        for e in (pre, dec):
            e.check_integrity()
            stats = e.load().transfer
            assert stats is not None and (stats.success, stats.failed) == (len(ps), 0)
    finally:
        pre.close()
        dec.close()


def test_decode_latents_are_the_prefills(v3: Path) -> None:
    """Right after the transfer (decode has not written yet), decode's pages hold the prefill's
    latent rows byte for byte."""
    cfg = DisaggConfig(backend="tcp", bootstrap_port=0)
    pre = Engine.build(engine_cfg(v3), DisaggConfig(**{**cfg.__dict__, "mode": "prefill"}))
    dec = Engine.build(engine_cfg(v3), DisaggConfig(**{**cfg.__dict__, "mode": "decode"}))
    try:
        p = prompts(1, seed=5)[0] + [11] * 9
        seen: dict[str, list[int]] = {}
        commit, after = dec.stage._commit, pre.stage.after_forward

        def spy_commit(req, rec):
            seen["dec"] = list(req.pages)
            seen["bytes"] = dec.pool.kv.clone()  # type: ignore[union-attr]
            return commit(req, rec)

        def spy_after(chunks):
            for c in chunks:
                seen["pre"] = list(c.req.pages)
            return after(chunks)

        dec.stage._commit, pre.stage.after_forward = spy_commit, spy_after
        one = PARAMS.__class__(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        run_pd(pre, dec, [p], one, 4242)
        n = len(p) // 4  # whole pages (the last, partial one too: compare the full ones)
        src = pre.pool.kv.view(3, -1, 4, 40)[:, seen["pre"][:n]]  # type: ignore[union-attr]
        dst = seen["bytes"].view(3, -1, 4, 40)[:, seen["dec"][:n]]
        assert torch.equal(src, dst) and src.abs().sum() > 0
    finally:
        pre.close()
        dec.close()


def test_each_latent_page_leaves_one_prefill_rank_per_decode_rank() -> None:
    """Every TP rank holds the whole latent (one "head" of one): a decode rank is fed by one prefill
    rank, a prefill rank it does not need sends only Done (count 0)."""
    from pdserve.disagg.transfer.tp.links import plan_links

    def links(p: int, d: int) -> list[tuple[int, int, int]]:
        return [(x.src_rank, x.dst_rank, x.heads.count) for x in plan_links([(0, 1)] * p, [(0, 1)] * d, 1)]

    assert links(2, 1) == [(0, 0, 1), (1, 0, 0)]
    assert links(1, 2) == [(0, 0, 1), (0, 1, 1)]
    assert links(2, 2) == [(0, 0, 1), (1, 1, 1)]
