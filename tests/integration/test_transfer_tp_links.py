"""Heterogeneous tensor parallelism at the transfer level: P prefill rank managers and D decode
rank managers (one per rank pool, in this process) move one room over the links tp_links.py
plans; each decode rank's pool then holds exactly its head slice of the prefill's KV, on every
backend, and every other byte of it is untouched."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, MetadataRecord
from pdserve.disagg.transfer import KVPoll, create_manager
from pdserve.disagg.transfer.all_of import link_receiver
from pdserve.disagg.transfer.shm_pool import allocate_shared_pool, sweep_stale_pools
from pdserve.disagg.transfer.tp_links import decode_links, plan_links

LAYERS, PAGES, PS, HD = 2, 24, 4, 8
_rooms = itertools.count(random.Random().randrange(1 << 40) << 20)


def rank_heads(total: int, rank: int, size: int) -> tuple[int, int]:
    """As model/tp.py's TPShard.kv_heads: a slice, or the replicated head of this rank."""
    if total >= size:
        return rank * (total // size), total // size
    return rank * total // size, 1


def pools(total: int, size: int, backend: str, role: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    g = torch.Generator().manual_seed(seed)
    for r in range(size):
        shape = (LAYERS, PAGES * PS, rank_heads(total, r, size)[1], HD)
        if role == "decode" and backend == "shm":
            p = allocate_shared_pool(shape, torch.float32)
            k, v = p.k, p.v
            k.fill_(-1.0)
            v.fill_(-1.0)
        elif role == "decode":
            k, v = torch.full(shape, -1.0), torch.full(shape, -1.0)
        else:
            k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        out.append((k, v))
    return out


def managers(pools_: list, total: int, size: int, backend: str, role: str) -> list:
    cfg = DisaggConfig(backend=backend, bootstrap_port=0, mode=role)
    out = []
    for r, (k, v) in enumerate(pools_):
        layout = KVLayout.for_pool("tiny", k, PS, rank_heads(total, r, size)[0], total)
        out.append(create_manager(backend, role, k, v, PS, layout, cfg))
    return out


def wait_all(parts: list, state: KVPoll, timeout: float = 30.0) -> None:
    for p in parts:
        assert p.wait(timeout, until=state) >= state, p.failure


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
    src, dst = pools(total, P, backend, "prefill", seed=P * 10 + D), pools(total, D, backend, "decode", seed=0)
    pre, dec = managers(src, total, P, backend, "prefill"), managers(dst, total, D, backend, "decode")
    try:
        room = next(_rooms)
        src_pages, dst_pages = [3, 4, 5, 11, 2], [7, 8, 20, 21, 1]
        sources = [(m.endpoint, rank_heads(total, r, P)) for r, m in enumerate(pre)]
        links = decode_links(sources, [rank_heads(total, r, D) for r in range(D)], total)
        senders = [m.sender(room) for m in pre]
        receivers = []
        for d, m in enumerate(dec):
            assert len(links[d]) == len({x.endpoint for x in links[d]})  # one link per source rank
            r = link_receiver(m, room, links[d])  # what rank d's agent opens (tp_control.py)
            r.init(dst_pages)
            receivers.append(r)
        wait_all(senders, KVPoll.WaitingForInput)
        record = MetadataRecord(room=room, first_token=5)
        for s in senders:
            s.send(src_pages, 0, True, record)
        wait_all(receivers, KVPoll.Success)
        wait_all(senders, KVPoll.Success)
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
