"""The shm backend (same host): the prefill copies pages straight into the decode's KV pool,
which lives in shared memory (one-sided, like an RDMA WRITE).

Lifecycle:
  decode   pool = allocate_shared_pool(shape, dtype); manager on pool.k / pool.v; its Hello
           carries ShmRegion(path, size, offsets, num_slots) for each prefill session.
  prefill  on Hello: check same machine, map the file -> decode's K/V as uint8 rows per layer;
           per send task, for each run: one strided memcpy of the run's bytes over a layer group
           (numpy: no torch intra-op threads, which thrash on a busy CPU; GIL released), layer
           groups in parallel on the shard's executor when it has more than one thread; then Done.
           A head-sliced room copies each slot's slice instead (pages.copy_head_runs).
  decode   learns completion from Done (the prefill finished every copy of the room before
           sending it); a failed room is freed only after prefill's RoomFailed (sent from the
           room's shard once no copy is in hand) or once the prefill process is gone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import HeadSlice, Hello, KVLayout, ShmRegion, region_decoder
from pdserve.disagg.transfer.backends.pages import PoolBytes, Run, byte_rows, copy_head_runs, copy_runs, head_view
from pdserve.disagg.transfer.backends.remote_pool import check_dst_runs
from pdserve.disagg.transfer.backends.shm_pool import lookup_shared_pool, map_shared_pool
from pdserve.disagg.transfer.sessions.identity import same_machine
from pdserve.disagg.transfer.sessions.manager import SessionTransferManager
from pdserve.disagg.transfer.sessions.wire import FrameSocket


@dataclass(eq=False)
class MappedPool:
    rows: list[np.ndarray] | None  # decode's K (and V) as uint8 rows [num_layers, layer_bytes]; None: closed
    num_pages: int
    heads: int  # KV heads per slot of decode's pool


class ShmTransferManager(SessionTransferManager):
    backend_name = "shm"
    one_sided = True

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1", **kwargs: Any) -> None:
        if k.device.type != "cpu":
            raise ValueError(f"the shm backend moves host memory; the KV pool is on {k.device}")
        self._shared = lookup_shared_pool(k, v) if role == "decode" else None
        if role == "decode" and self._shared is None:
            raise ValueError("shm backend: the decode KV pool must live in shared memory; allocate its k/v "
                             "with pdserve.disagg.transfer.backends.shm_pool.allocate_shared_pool(shape, dtype)")
        super().__init__(role, k, v, page_size, layout, config, host, **kwargs)
        self.pool = PoolBytes(k, v, page_size)

    def hello_region(self) -> bytes:
        p = self._shared
        assert p is not None
        return msgspec.msgpack.encode(ShmRegion(path=p.path, size=p.size, k_offset=p.k_offset,
                                                v_offset=p.v_offset, num_slots=p.k.shape[1], heads=p.k.shape[2]))

    def open_region(self, hello: Hello) -> MappedPool:
        if not same_machine(hello.identity):
            raise ValueError("the shm backend needs prefill and decode on the same machine")
        region = region_decoder.decode(hello.region)
        if region.num_slots % self.page_size:
            raise ValueError(f"decode pool has {region.num_slots} slots, not a multiple of {self.page_size}")
        L, _, H, D = self.k.shape
        H = region.heads or H
        if (region.v_offset < 0) != (self.v is None):
            raise ValueError("decode pool and prefill pool differ in their tensors (K and V, or a latent alone)")
        k, v = map_shared_pool(region.path, region.size, region.k_offset, region.v_offset,
                               (L, region.num_slots, H, D), self.k.dtype)
        return MappedPool([byte_rows(t) for t in (k, v) if t is not None], region.num_slots // self.page_size, H)

    def close_region(self, region: Any) -> None:
        region.rows = None  # the mapping goes with the last tensor view

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int:
        dst: MappedPool = region
        check_dst_runs(runs, dst.num_pages)
        num_layers = self.k.shape[0]
        workers = executor._max_workers if executor is not None else 1  # noqa: SLF001
        step = -(-num_layers // max(1, min(workers, num_layers)))
        groups = [(l0, min(num_layers, l0 + step)) for l0 in range(0, num_layers, step)]
        if executor is None or len(groups) == 1:
            for l0, l1 in groups:
                self._copy(dst, runs, l0, l1, heads)
        else:
            for f in [executor.submit(self._copy, dst, runs, l0, l1, heads) for l0, l1 in groups]:
                f.result()
        return 0

    def _copy(self, dst: MappedPool, runs: list[Run], l0: int, l1: int, heads: HeadSlice | None) -> None:
        rows = dst.rows
        if rows is None:
            raise RuntimeError("decode session closed")
        hb, ps = self.pool.head_bytes, self.page_size
        for d, src_rows, src_heads in zip(rows, self.pool.rows, self.pool.head_views):
            if heads is None:
                copy_runs(d, src_rows, runs, self.pool.span, l0, l1)
            else:
                copy_head_runs(head_view(d, dst.heads, hb), src_heads, runs, ps, heads, l0, l1)
