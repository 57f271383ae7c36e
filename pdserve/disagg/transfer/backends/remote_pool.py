"""A decode pool as one-sided engines (nixl, mooncake) address it: base addresses, not mappings.

Lifecycle: the decode describes its pool once (`pool_region(k, v)`, sent in its Hello); the
prefill checks it against its own (`check_region`) and, per send, checks the destination runs
(`check_dst_runs`) and turns them into byte segments (`segments`) that the engine writes.

Addresses (see pages.py for the page layout; both pools are [layers, slots, heads, head_dim]):

    src  = k_base_local  + layer * src_layer_bytes + src_page * span
    dst  = k_base_remote + layer * dst_layer_bytes + dst_page * span      (then the same for V)
    len  = n_pages * span

Segments are listed layer-major; neighbours contiguous on BOTH sides merge, so a run that
covers whole layers of two equal pools is one segment for all layers. K and V never merge:
engines register them as separate buffers. A latent pool (MLA) is K alone: v_base 0.

A head-sliced room (tp/links.py) moves per (layer, slot) one range of count * head_bytes bytes:

    src  = k_base_local  + (layer * src_slots + src_slot) * src_slot_bytes + src_start * head_bytes
    dst  = k_base_remote + (layer * dst_slots + dst_slot) * dst_slot_bytes + dst_start * head_bytes

(page_size segments per page per layer; they merge only where both sides are contiguous).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from pdserve.disagg.messages import HeadSlice, PoolRegion
from pdserve.disagg.transfer.backends.pages import Run


def pool_region(k: torch.Tensor, v: torch.Tensor | None) -> PoolRegion:
    """Where a contiguous [layers, slots, heads, head_dim] K/V pool (v None: K alone) lives in this process."""
    for name, t in (("k", k), ("v", v)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"the KV pool tensor {name} must be contiguous")
    return PoolRegion(k_base=k.data_ptr(), v_base=0 if v is None else v.data_ptr(), num_slots=k.shape[1],
                      slot_bytes=k.shape[2] * k.shape[3] * k.element_size(), head_bytes=k.shape[3] * k.element_size())


def check_region(region: PoolRegion, local: PoolRegion, page_size: int) -> int:
    """Raise ValueError unless decode's pool fits ours; return its number of pages."""
    if (region.head_bytes or region.slot_bytes) != (local.head_bytes or local.slot_bytes) \
            or region.slot_bytes % (region.head_bytes or region.slot_bytes):
        raise ValueError(f"decode pool heads of {region.head_bytes or region.slot_bytes} B in slots of "
                         f"{region.slot_bytes} B do not match the prefill's {local.head_bytes or local.slot_bytes} B heads")
    if region.num_slots <= 0 or region.num_slots % page_size:
        raise ValueError(f"decode pool has {region.num_slots} slots, not a positive multiple of {page_size}")
    if not region.k_base:
        raise ValueError("decode pool has a null base address")
    if (region.v_base == 0) != (local.v_base == 0):
        raise ValueError("decode pool and prefill pool differ in their tensors (K and V, or a latent alone)")
    return region.num_slots // page_size


def check_dst_runs(runs: Iterable[Run], num_pages: int) -> None:
    """Raise ValueError naming the destination ranges outside decode's pool."""
    bad = [(d, n) for _, d, n in runs if d < 0 or n < 0 or d + n > num_pages]
    if bad:
        raise ValueError(f"destination pages outside decode's pool of {num_pages}: "
                         + ", ".join(f"{d}..{d + n - 1}" for d, n in bad[:8]))


def segments(runs: list[Run], num_layers: int, span: int, src_layer_bytes: int,
             dst_layer_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src offsets, dst offsets, lengths) of every (layer, run) byte range of ONE tensor,
    layer-major, ranges contiguous on both sides merged. Add each side's base address."""
    if not runs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    r = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    layers = np.arange(num_layers, dtype=np.int64)[:, None]
    src = (layers * src_layer_bytes + r[:, 0] * span).reshape(-1)
    dst = (layers * dst_layer_bytes + r[:, 1] * span).reshape(-1)
    length = np.broadcast_to(r[:, 2] * span, (num_layers, len(r))).reshape(-1)
    starts = np.ones(len(src), dtype=bool)
    starts[1:] = (src[:-1] + length[:-1] != src[1:]) | (dst[:-1] + length[:-1] != dst[1:])
    idx = np.flatnonzero(starts)
    return src[idx], dst[idx], np.add.reduceat(length, idx)


def slice_segments(runs: list[Run], num_layers: int, page_size: int, src: PoolRegion, dst: PoolRegion,
                   heads: HeadSlice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As segments() for a head slice: one (layer, slot) range each, layer-major, none merged."""
    hb = src.head_bytes or src.slot_bytes
    if not runs or heads.count == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    s_slots = np.concatenate([s * page_size + np.arange(n * page_size, dtype=np.int64) for s, _, n in runs])
    d_slots = np.concatenate([d * page_size + np.arange(n * page_size, dtype=np.int64) for _, d, n in runs])
    layers = np.arange(num_layers, dtype=np.int64)[:, None]
    off_s = ((layers * src.num_slots + s_slots) * src.slot_bytes + heads.src_start * hb).reshape(-1)
    off_d = ((layers * dst.num_slots + d_slots) * dst.slot_bytes + heads.dst_start * hb).reshape(-1)
    return off_s, off_d, np.full(len(off_s), heads.count * hb, dtype=np.int64)


def kv_segments(runs: list[Run], num_layers: int, page_size: int, src: PoolRegion,
                dst: PoolRegion, heads: HeadSlice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absolute (src address, dst address, length) of every segment: K's, then V's (if any)."""
    if heads is not None:
        off_s, off_d, length = slice_segments(runs, num_layers, page_size, src, dst, heads)
    else:
        span = page_size * src.slot_bytes
        off_s, off_d, length = segments(runs, num_layers, span, src.num_slots * src.slot_bytes,
                                        dst.num_slots * dst.slot_bytes)
    if not src.v_base:
        return src.k_base + off_s, dst.k_base + off_d, length
    return (np.concatenate([src.k_base + off_s, src.v_base + off_s]),
            np.concatenate([dst.k_base + off_d, dst.v_base + off_d]), np.concatenate([length, length]))
