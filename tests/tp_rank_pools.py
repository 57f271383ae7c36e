"""One process holding every rank of a prefill and a decode server at the transfer level: a KV
pool per rank (its KV heads only) and a transfer manager on each, so a room can move over the
links transfer/tp/links.py plans without engines. Used by tests/integration/test_transfer_tp_links.py and
benchmarks/tp_overhead.py (the benchmark puts the repo root on sys.path to import it).

    src = rank_pools(Shape(...), total, P, backend, "prefill", seed=1)   # random KV
    dst = rank_pools(shape, total, D, backend, "decode", seed=0)         # -1 everywhere
    pre, dec = managers(src, ...), managers(dst, ...)
    receivers, record = move_room(pre, dec, total, src_pages, dst_pages)  # one room, every link
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, MetadataRecord
from pdserve.disagg.transfer import KVPoll, create_manager
from pdserve.disagg.transfer.backends.shm_pool import allocate_shared_pool
from pdserve.disagg.transfer.base import KVReceiver, TransferManager
from pdserve.disagg.transfer.rooms.all_of import link_receiver
from pdserve.disagg.transfer.tp.links import decode_links

_rooms = itertools.count(random.Random().randrange(1 << 40) << 20)
Pool = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    layers: int
    pages: int
    page_size: int
    head_dim: int
    dtype: torch.dtype = torch.float32


def rank_heads(total: int, rank: int, size: int) -> tuple[int, int]:
    """As model/tp.py's TPShard.kv_heads: a slice, or the replicated head of this rank."""
    if total >= size:
        return rank * (total // size), total // size
    return rank * total // size, 1


def rank_pools(shape: Shape, total: int, size: int, backend: str, role: str, seed: int) -> list[Pool]:
    out = []
    g = torch.Generator().manual_seed(seed)
    for r in range(size):
        dims = (shape.layers, shape.pages * shape.page_size, rank_heads(total, r, size)[1], shape.head_dim)
        if role == "decode" and backend == "shm":
            p = allocate_shared_pool(dims, shape.dtype)
            k, v = p.k, p.v
            k.fill_(-1.0)
            v.fill_(-1.0)
        elif role == "decode":
            k, v = torch.full(dims, -1.0, dtype=shape.dtype), torch.full(dims, -1.0, dtype=shape.dtype)
        else:
            k, v = torch.randn(dims, generator=g).to(shape.dtype), torch.randn(dims, generator=g).to(shape.dtype)
        out.append((k, v))
    return out


def managers(pools: list[Pool], page_size: int, total: int, backend: str, role: str) -> list[TransferManager]:
    cfg = DisaggConfig(backend=backend, bootstrap_port=0, mode=role)
    out = []
    for r, (k, v) in enumerate(pools):
        layout = KVLayout.for_pool("tiny", k, page_size, rank_heads(total, r, len(pools))[0], total)
        out.append(create_manager(backend, role, k, v, page_size, layout, cfg))
    return out


def wait_all(parts: list, state: KVPoll, timeout: float = 30.0) -> None:
    for p in parts:
        assert p.wait(timeout, until=state) >= state, p.failure


def move_room(pre: list[TransferManager], dec: list[TransferManager], total: int, src_pages: list[int],
              dst_pages: list[int]) -> tuple[list[KVReceiver], MetadataRecord]:
    """One room from every prefill rank to every decode rank, as a TP PD server moves it: each
    decode rank opens its links (what its agent does, transfer/tp/agent.py), the prefill ranks send all
    pages at once. Returns the decode ranks' receivers (all Success) and the record sent."""
    room = next(_rooms)
    P, D = len(pre), len(dec)
    sources = [(m.endpoint, rank_heads(total, r, P)) for r, m in enumerate(pre)]
    links = decode_links(sources, [rank_heads(total, r, D) for r in range(D)], total)
    senders = [m.sender(room) for m in pre]
    receivers = []
    for d, m in enumerate(dec):
        assert len(links[d]) == len({x.endpoint for x in links[d]})  # one link per source rank
        r = link_receiver(m, room, links[d])
        r.init(dst_pages)
        receivers.append(r)
    wait_all(senders, KVPoll.WaitingForInput)
    record = MetadataRecord(room=room, first_token=5)
    for s in senders:
        s.send(src_pages, 0, True, record)
    wait_all(receivers, KVPoll.Success)
    wait_all(senders, KVPoll.Success)
    return receivers, record
