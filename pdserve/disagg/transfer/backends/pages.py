"""Page arithmetic shared by the backends: runs of pages, byte spans of the pool, frame plans.

Lifecycle: a manager wraps its pool once (`PoolBytes(k, v, page_size)`); per send it turns
(src_pages, dst_pages) into runs, plans frames/copies over (runs x layer groups), and maps each
(layer, K|V, run) to a byte span of the pool.

Pool memory (one tensor each for K and V, contiguous; an MLA latent pool is K alone, v None:
every "K|V" below is then K only, and a frame carries half the spans):

    k: [num_layers, num_slots = num_pages * page_size, kv_heads, head_dim]

    byte 0                                                          layer_bytes = num_slots * slot_bytes
    |<------------------------------- layer 0 ------------------------------->|<--- layer 1 ...
    | page 0 | page 1 | page 2 | ...                              | page N-1   | page 0 | ...
    |<-span->|   span = page_size * slot_bytes,  slot_bytes = kv_heads * head_dim * itemsize

    offset(layer, page) = layer * layer_bytes + page * span
    pages p..p+n-1 of one layer are ONE contiguous byte range of n * span bytes

Runs merge pages that are consecutive on BOTH sides (src and dst ids differ):

    src_pages = [7, 8, 9, 3]          runs (src, dst, n) = [(7, 20, 3), (3, 40, 1)]
    dst_pages = [20, 21, 22, 40]      -> 2 spans per layer per K/V instead of 4

A frame (tcp) or copy group (shm) covers runs[a:b] x layers[l0:l1); its bytes are ordered
    for layer in l0..l1-1: for K, then V: for run in runs[a:b]: span(layer, run)
which both sides compute from the same header, so no per-page metadata crosses the wire.

A head-sliced room (tensor parallelism of different sizes, tp/links.py) moves for each
(layer, K|V, run) the slice [start, start + count) of every slot's heads, in the same order:
gathered into a contiguous buffer [layers, K|V, slots, count, head_bytes] (or scattered from
it) by one fancy-indexed copy per (frame, K|V) on tcp, one strided copy per run over a layer
group on shm; never a numpy call per (layer, run).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.disagg.messages import HeadSlice

Run = tuple[int, int, int]  # (src_page, dst_page, n_pages)

MAX_IOV = 512  # spans per frame (Linux IOV_MAX is 1024)
MAX_FRAME_BYTES = 32 << 20  # bounds how long one frame holds a room "being written"


def page_runs(src_pages: list[int], dst_pages: list[int]) -> list[Run]:
    """Merge pages consecutive on both sides into (src, dst, n) runs, in order."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    runs: list[Run] = []
    for s, d in zip(src_pages, dst_pages):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


@dataclass(frozen=True)
class FramePlan:
    run_start: int
    run_end: int
    layer_start: int
    layer_end: int
    nbytes: int


def plan_frames(runs: list[Run], num_layers: int, span_bytes: int,
                max_iov: int = MAX_IOV, max_bytes: int = MAX_FRAME_BYTES, tensors: int = 2) -> list[FramePlan]:
    """Cut runs x layers into frames of at most `max_iov` spans and about `max_bytes` bytes
    (a single layer of a single run may exceed max_bytes; it is never split); `tensors` per layer."""
    plans: list[FramePlan] = []
    n = tensors
    a = 0
    while a < len(runs):
        b, pages = a, 0
        while b < len(runs) and n * (b - a + 1) <= max_iov and \
                (b == a or n * (pages + runs[b][2]) * span_bytes <= max_bytes):
            pages += runs[b][2]
            b += 1
        per_layer = n * pages * span_bytes
        layers = max(1, min(num_layers, max_iov // (n * (b - a)), max_bytes // max(per_layer, 1)))
        for l0 in range(0, num_layers, layers):
            l1 = min(num_layers, l0 + layers)
            plans.append(FramePlan(a, b, l0, l1, (l1 - l0) * per_layer))
        a = b
    return plans


def check_pages(pages: list[int], num_pages: int, what: str) -> None:
    """Raise ValueError naming the page ids outside 0..num_pages-1."""
    bad = [p for p in pages if not 0 <= p < num_pages]
    if bad:
        raise ValueError(f"{what} page ids out of range 0..{num_pages - 1}: {bad[:8]}")


def byte_rows(t: torch.Tensor) -> np.ndarray:
    """A CPU pool tensor as uint8 rows [num_layers, layer_bytes] sharing its memory."""
    if t.device.type != "cpu":
        raise ValueError(f"this transfer backend moves host memory; the KV pool is on {t.device} "
                         "(use a GPU-capable backend such as nixl for device pools)")
    if not t.is_contiguous():
        raise ValueError("the KV pool tensor must be contiguous")
    return t.detach().reshape(t.shape[0], -1).view(torch.uint8).numpy()


def copy_runs(dst_rows: np.ndarray, src_rows: np.ndarray, runs: list[Run], span: int, l0: int, l1: int) -> None:
    """dst pages <- src pages for layers [l0, l1): one strided numpy copy per run (plain memcpy
    of each layer's row; no torch intra-op threads, and the GIL is released while copying)."""
    for s, d, n in runs:
        np.copyto(dst_rows[l0:l1, d * span:(d + n) * span], src_rows[l0:l1, s * span:(s + n) * span])


def head_view(rows: np.ndarray, heads: int, head_bytes: int) -> np.ndarray:
    """uint8 rows [num_layers, layer_bytes] as [num_layers, slots, heads, head_bytes] (a view)."""
    return rows.reshape(rows.shape[0], -1, heads, head_bytes)


def slot_index(runs: list[Run], side: int, page_size: int) -> np.ndarray:
    """The pool slots of `runs` in order (side 0 = source pages, 1 = destination pages)."""
    if not runs:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(r[side] * page_size, (r[side] + r[2]) * page_size) for r in runs])


def copy_head_runs(dst: np.ndarray, src: np.ndarray, runs: list[Run], page_size: int, heads: HeadSlice,
                   l0: int, l1: int) -> None:
    """As copy_runs for a head slice; dst and src are head_view()s of their pools. One strided
    copy per run over all layers (faster here than one fancy-indexed gather + scatter)."""
    a, b, c = heads.src_start, heads.dst_start, heads.count
    for s, d, n in runs:
        np.copyto(dst[l0:l1, d * page_size:(d + n) * page_size, b:b + c],
                  src[l0:l1, s * page_size:(s + n) * page_size, a:a + c])


class PoolBytes:
    """Byte views of a CPU KV pool (k, v; v None: K alone), numpy rows and flat memoryviews for
    socket I/O, one per tensor (`rows`, `bytes`, `head_views`: K's, then V's)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor | None, page_size: int) -> None:
        tensors = (k,) if v is None else (k, v)
        self.rows = [byte_rows(t) for t in tensors]
        self.bytes = [memoryview(r.reshape(-1)) for r in self.rows]
        self.num_layers = k.shape[0]
        self.num_pages = k.shape[1] // page_size
        self.page_size = page_size
        self.heads = k.shape[2]
        self.head_bytes = k.shape[3] * k.element_size()
        self.span = page_size * k.shape[2] * k.shape[3] * k.element_size()
        self.layer_bytes = self.num_pages * self.span
        self.head_views = [head_view(r, self.heads, self.head_bytes) for r in self.rows]

    @property
    def tensors(self) -> int:
        return len(self.rows)

    def slice_span(self, heads: HeadSlice) -> int:
        """Wire bytes of one page of one layer of K (or V) of a head slice."""
        return self.page_size * heads.count * self.head_bytes

    def staging(self, runs: list[Run], plan: FramePlan, heads: HeadSlice) -> np.ndarray:
        """A contiguous buffer for a head-sliced frame, in wire order:
        [layers, K|V, slots of runs[a:b] in order, count, head_bytes]."""
        slots = sum(r[2] for r in runs[plan.run_start:plan.run_end]) * self.page_size
        shape = (plan.layer_end - plan.layer_start, self.tensors, slots, heads.count, self.head_bytes)
        return np.empty(shape, np.uint8)

    def gather_heads(self, runs: list[Run], plan: FramePlan, heads: HeadSlice) -> np.ndarray:
        """The frame's head slices of the source pages, contiguous in wire order (staging shape):
        one fancy-indexed gather per K|V (a frame spans few layers and many runs)."""
        out = self.staging(runs, plan, heads)
        idx = slot_index(runs[plan.run_start:plan.run_end], 0, self.page_size)
        layers, start = slice(plan.layer_start, plan.layer_end), heads.src_start
        for kv, pool in enumerate(self.head_views):
            out[:, kv] = pool[layers, idx, start:start + heads.count]
        return out

    def scatter_heads(self, runs: list[Run], plan: FramePlan, heads: HeadSlice, staged: np.ndarray) -> None:
        """Inverse of gather_heads into the destination pages."""
        idx = slot_index(runs[plan.run_start:plan.run_end], 1, self.page_size)
        layers, start = slice(plan.layer_start, plan.layer_end), heads.dst_start
        for kv, pool in enumerate(self.head_views):
            pool[layers, idx, start:start + heads.count] = staged[:, kv]

    def spans(self, runs: list[Run], plan: FramePlan, side: int) -> Iterator[memoryview]:
        """The frame's byte spans in wire order; side 0 = source pages, 1 = destination pages."""
        for layer in range(plan.layer_start, plan.layer_end):
            base = layer * self.layer_bytes
            for buf in self.bytes:
                for run in runs[plan.run_start:plan.run_end]:
                    start = base + run[side] * self.span
                    yield buf[start:start + run[2] * self.span]
