"""Heterogeneous tensor parallelism at the transfer level: P prefill rank managers and D decode
rank managers (one per rank pool, in this process) move one room over the links transfer/tp/links.py
plans; each decode rank's pool then holds exactly its head slice of the prefill's KV, on every
backend, and every other byte of it is untouched."""

from __future__ import annotations

import pytest
import torch

from pdserve.disagg.transfer.backends.shm_pool import sweep_stale_pools
from pdserve.disagg.transfer.tp.links import plan_links
from tests.tp_rank_pools import Shape, managers, move_room, rank_heads, rank_pools

SHAPE = Shape(layers=2, pages=24, page_size=4, head_dim=8)
PS = SHAPE.page_size


def test_links_cover_every_decode_head_once_and_feed_every_prefill_rank() -> None:
    for total, P, D in [(4, 1, 4), (4, 4, 1), (4, 2, 4), (2, 4, 2), (1, 2, 1), (1, 1, 2), (3, 3, 1), (3, 1, 3)]:
        pre = [rank_heads(total, r, P) for r in range(P)]
        dec = [rank_heads(total, r, D) for r in range(D)]
        links = plan_links(pre, dec, total)
        for d, (start, n) in enumerate(dec):
            covered = []
            for link in (x for x in links if x.dst_rank == d):
                for i in range(link.heads.count):  # the same global head on both sides
                    src_head = pre[link.src_rank][0] + link.heads.src_start + i
                    dst_head = start + link.heads.dst_start + i
                    assert src_head == dst_head and src_head < sum(pre[link.src_rank]), (total, P, D, link)
                    covered.append(dst_head)
            assert sorted(covered) == list(range(start, start + n)), (total, P, D, d)
        assert {x.src_rank for x in links} == set(range(P))  # every prefill rank takes part


@pytest.mark.parametrize("backend", ["tcp", "shm", "nixl", "mooncake"])
@pytest.mark.parametrize("total,P,D", [(4, 1, 2), (4, 2, 1), (4, 2, 4), (1, 2, 2)])
def test_each_decode_rank_gets_exactly_its_head_slice(backend: str, total: int, P: int, D: int) -> None:
    src = rank_pools(SHAPE, total, P, backend, "prefill", seed=P * 10 + D)
    dst = rank_pools(SHAPE, total, D, backend, "decode", seed=0)
    pre, dec = managers(src, PS, total, backend, "prefill"), managers(dst, PS, total, backend, "decode")
    try:
        src_pages, dst_pages = [3, 4, 5, 11, 2], [7, 8, 20, 21, 1]
        receivers, record = move_room(pre, dec, total, src_pages, dst_pages)
        sources = [(m.endpoint, rank_heads(total, r, P)) for r, m in enumerate(pre)]
        plan = plan_links([h for _, h in sources], [rank_heads(total, r, D) for r in range(D)], total)
        for d, (k, v) in enumerate(dst):
            for side, got in ((0, k), (1, v)):
                want = torch.full_like(got, -1.0)
                for link in (x for x in plan if x.dst_rank == d):
                    a, b, c = link.heads.src_start, link.heads.dst_start, link.heads.count
                    for sp, dp in zip(src_pages, dst_pages):
                        want[:, dp * PS:(dp + 1) * PS, b:b + c] = src[link.src_rank][side][:, sp * PS:(sp + 1) * PS, a:a + c]
                assert torch.equal(got, want), (backend, d, side)  # its slice landed, nothing else changed
                assert bool((got[:, [s * PS + i for s in dst_pages for i in range(PS)]] != -1.0).all())
            assert receivers[d].metadata() == record
    finally:
        for m in pre + dec:
            m.close()
        sweep_stale_pools()
