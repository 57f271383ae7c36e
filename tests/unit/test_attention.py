"""Paged decode attention: rows grouped by context length give the same output as one padded
batch, and the grouping bounds the padding."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from pdserve.engine import attention
from pdserve.engine.attention import PagedAttention, build_metadata, group_by_width
from pdserve.engine.kv_cache import KVPool

PS = 4


def test_group_by_width_bounds_padding() -> None:
    widths = [5, 3, 63, 4, 14, 4, 13]
    groups = group_by_width(widths)
    assert sorted(i for g in groups for i in g) == list(range(len(widths)))
    assert [[widths[i] for i in g] for g in groups] == [[3, 4, 4, 5], [13, 14], [63]]
    for g in groups:
        w = [widths[i] for i in g]
        assert len(w) * max(w) <= attention.DECODE_PAD_WASTE * sum(w)
    assert group_by_width([7, 7, 7]) == [[0, 1, 2]]
    assert group_by_width([]) == []


def test_grouped_decode_equals_one_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(0)
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=8)
    pool = KVPool(cfg, num_pages=200, page_size=PS, device=torch.device("cpu"), dtype=torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    free = list(range(1, 200))
    rng.shuffle(free)
    chunks = []
    for n in [3, 250, 9, 41, 5, 120, 17]:  # context lengths: one long among short ones
        pages = [free.pop() for _ in range(-(-n // PS))]
        chunks.append((pages, n - 1, 1))  # a decode row: position n-1
    q = torch.randn(len(chunks), 4, 8)
    kv = torch.randn(len(chunks), 2, 8)
    grouped = build_metadata(chunks, PS, torch.device("cpu"))
    assert len(grouped.decode_groups) > 1
    monkeypatch.setattr(attention, "DECODE_PAD_WASTE", float("inf"))
    monkeypatch.setattr(attention.group_by_width, "__defaults__", (float("inf"),))
    single = build_metadata(chunks, PS, torch.device("cpu"))
    assert len(single.decode_groups) == 1
    for layer in range(2):
        a = PagedAttention(pool, grouped)(layer, q, kv, kv)
        b = PagedAttention(pool, single)(layer, q, kv, kv)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
