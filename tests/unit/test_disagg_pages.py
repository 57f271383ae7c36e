"""Page runs, frame plans and byte spans of the pool (the transfer backends' index arithmetic)."""

from __future__ import annotations

import pytest
import torch

from pdserve.disagg.transfer.backends.pages import PoolBytes, check_pages, page_runs, plan_frames


def test_page_runs_merge_only_when_both_sides_are_consecutive() -> None:
    assert page_runs([7, 8, 9, 3], [20, 21, 22, 40]) == [(7, 20, 3), (3, 40, 1)]
    assert page_runs([1, 2, 3], [5, 7, 8]) == [(1, 5, 1), (2, 7, 2)]
    assert page_runs([], []) == []
    with pytest.raises(ValueError):
        page_runs([1], [1, 2])


@pytest.mark.parametrize("runs, layers, max_iov, max_bytes", [
    ([(0, 0, 1)] * 5, 3, 4, 10**9),
    ([(0, 0, 3), (5, 9, 2)], 4, 512, 64),
    ([(i, i, 1) for i in range(300)], 2, 512, 10**9),
])
def test_plans_cover_runs_x_layers_exactly_once(runs, layers, max_iov, max_bytes) -> None:
    plans = plan_frames(runs, layers, span_bytes=16, max_iov=max_iov, max_bytes=max_bytes)
    covered = [(r, l) for p in plans for r in range(p.run_start, p.run_end) for l in range(p.layer_start, p.layer_end)]
    assert sorted(covered) == [(r, l) for r in range(len(runs)) for l in range(layers)]
    for p in plans:
        assert 2 * (p.run_end - p.run_start) * (p.layer_end - p.layer_start) <= max(max_iov, 2)
        pages = sum(n for _, _, n in runs[p.run_start:p.run_end])
        assert p.nbytes == 2 * (p.layer_end - p.layer_start) * pages * 16


def test_spans_are_the_pool_pages_in_wire_order() -> None:
    L, ps, H, D = 3, 2, 2, 4
    k = torch.arange(L * 6 * ps * H * D, dtype=torch.float32).reshape(L, 6 * ps, H, D)
    v = -k
    pool = PoolBytes(k, v, ps)
    runs = page_runs([4, 5, 1], [0, 1, 3])
    plan = plan_frames(runs, L, pool.span)[0]
    got = b"".join(bytes(m) for m in pool.spans(runs, plan, side=0))
    want = b"".join(t[l, s * ps:(s + n) * ps].numpy().tobytes()
                    for l in range(L) for t in (k, v) for s, _, n in runs)
    assert got == want
    dst = b"".join(bytes(m) for m in pool.spans(runs, plan, side=1))
    assert dst[:pool.span * 2] == k[0, 0:2 * ps].numpy().tobytes()
    with pytest.raises(ValueError, match="out of range"):
        check_pages([6], pool.num_pages, "source")
