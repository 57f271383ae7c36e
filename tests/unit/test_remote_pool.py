"""remote_pool: how one-sided engines (nixl, mooncake) address a decode pool: region checks and
the byte segments of a send (layer-major, merged when contiguous on both sides, K and V apart)."""

from __future__ import annotations

import ctypes

import msgspec
import pytest
import torch

from pdserve.disagg.messages import PoolRegion
from pdserve.disagg.transfer.backends import remote_pool as rp
from pdserve.disagg.transfer.backends.remote_pool import segments

L, H, D, PS = 3, 2, 4, 2  # slot_bytes = 2 * 4 * 4 = 32, span = 64
SPAN = 100


def region(k_base: int = 1 << 20, v_base: int = 1 << 24, num_slots: int = 16, slot_bytes: int = 32,
           head_bytes: int = 0) -> PoolRegion:
    return PoolRegion(k_base=k_base, v_base=v_base, num_slots=num_slots, slot_bytes=slot_bytes, head_bytes=head_bytes)


def segs(runs, src: PoolRegion, dst: PoolRegion, num_layers: int, page_size: int) -> tuple[list[int], list[int], list[int]]:
    s, d, n = rp.kv_segments(runs, num_layers, page_size, src, dst)
    return s.tolist(), d.tolist(), n.tolist()


def test_segments_one_per_layer_and_run() -> None:
    src, dst, length = segments([(7, 20, 3), (3, 40, 1)], 2, SPAN, 1000, 5000)
    assert src.tolist() == [700, 300, 1700, 1300]
    assert dst.tolist() == [2000, 4000, 7000, 9000]
    assert length.tolist() == [300, 100, 300, 100]


def test_segments_merge_when_contiguous_on_both_sides() -> None:
    # runs adjacent on both sides (from two page_runs calls) become one segment per layer
    src, dst, length = segments([(0, 4, 2), (2, 6, 1)], 2, SPAN, 1000, 1000)
    assert (src.tolist(), dst.tolist(), length.tolist()) == ([0, 1000], [400, 1400], [300, 300])
    # whole layers of equal-sized pools: one segment for everything
    src, dst, length = segments([(0, 0, 10)], 3, SPAN, 1000, 1000)
    assert (src.tolist(), dst.tolist(), length.tolist()) == ([0], [0], [3000])
    # contiguous on the source only: not merged
    src, dst, length = segments([(0, 0, 10)], 2, SPAN, 1000, 2000)
    assert length.tolist() == [1000, 1000]


def test_segments_empty() -> None:
    src, dst, length = segments([], 4, SPAN, 1000, 1000)
    assert len(src) == len(dst) == len(length) == 0


def test_region_checks() -> None:
    local = region()
    assert rp.check_region(region(), local, PS) == 8
    with pytest.raises(ValueError, match="do not match the prefill's 32 B heads"):
        rp.check_region(region(slot_bytes=64), local, PS)
    sliced = msgspec.structs.replace(local, head_bytes=16)  # tensor parallelism: 2 heads of 16 B per slot
    assert rp.check_region(region(slot_bytes=64, head_bytes=16), sliced, PS) == 8  # decode holds 4 heads
    with pytest.raises(ValueError, match="not a positive multiple of 2"):
        rp.check_region(region(num_slots=15), local, PS)
    with pytest.raises(ValueError, match="null base"):
        rp.check_region(region(k_base=0), local, PS)
    rp.check_dst_runs([(0, 0, 8), (3, 7, 1)], 8)
    with pytest.raises(ValueError, match=r"outside decode's pool of 8: 7\.\.8"):
        rp.check_dst_runs([(0, 7, 2)], 8)
    with pytest.raises(ValueError, match=r"-1\.\.-1"):
        rp.check_dst_runs([(0, -1, 1)], 8)


def test_segment_addresses() -> None:
    src, dst = region(), region(k_base=1 << 28, v_base=1 << 30, num_slots=32)
    seg = segs([(1, 5, 2), (6, 0, 1)], src, dst, L, PS)
    span, src_layer, dst_layer = PS * 32, 16 * 32, 32 * 32
    expected = [(sb + l * src_layer + s * span, db + l * dst_layer + d * span, n * span)
                for sb, db in ((src.k_base, dst.k_base), (src.v_base, dst.v_base))
                for l in range(L) for s, d, n in ((1, 5, 2), (6, 0, 1))]
    assert list(zip(*seg)) == expected
    # a run over a whole layer on both sides is contiguous across layers: one segment per K/V
    whole = segs([(0, 0, 8)], src, region(k_base=1 << 28, v_base=1 << 30), L, PS)
    assert whole == ([src.k_base, src.v_base], [1 << 28, 1 << 30], [L * src_layer] * 2)
    # K and V adjacent in memory on both sides (one shared mapping) stay two segments: separate buffers
    kv = region(k_base=1 << 20, v_base=(1 << 20) + L * src_layer)
    adjacent = segs([(0, 0, 8)], kv, kv, L, PS)
    assert adjacent[0] == [kv.k_base, kv.v_base] and adjacent[2] == [L * src_layer] * 2


def test_segments_move_the_right_bytes() -> None:
    """Apply the segments as plain memmoves between two real pools: exactly the pages land."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(L, 8 * PS, H, D, generator=gen) for _ in range(2))
    dk, dv = torch.zeros(L, 12 * PS, H, D), torch.zeros(L, 12 * PS, H, D)
    src, dst = rp.pool_region(k, v), rp.pool_region(dk, dv)
    assert (src.num_slots, src.slot_bytes, dst.num_slots) == (8 * PS, H * D * 4, 12 * PS)
    pairs = [(7, 11), (1, 2), (2, 3), (5, 0), (6, 1)]
    runs = [(s, d, 1) for s, d in pairs]
    seg = segs(runs, src, dst, L, PS)
    assert len(seg[0]) == 2 * L * 3  # (1,2)+(2,3) and (5,0)+(6,1) merged
    for a, b, n in zip(*seg):
        ctypes.memmove(b, a, n)
    expect_k, expect_v = torch.zeros_like(dk), torch.zeros_like(dv)
    for s, d in pairs:
        expect_k[:, d * PS:(d + 1) * PS] = k[:, s * PS:(s + 1) * PS]
        expect_v[:, d * PS:(d + 1) * PS] = v[:, s * PS:(s + 1) * PS]
    assert torch.equal(dk, expect_k) and torch.equal(dv, expect_v)


def test_non_contiguous_pool_is_refused() -> None:
    k = torch.zeros(L, 8 * PS, H, D * 2)[..., :D]
    with pytest.raises(ValueError, match="contiguous"):
        rp.pool_region(k, k)
