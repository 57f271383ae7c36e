"""Paged decode attention: rows grouped by context length give the same output as one padded
batch, and the grouping bounds the padding."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from pdserve.engine import attention, kernels
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


def _random_layout(rng: random.Random, n_pages: int) -> list[tuple[list[int], int, int]]:
    """Chunks over shuffled pages: decode rows of mixed lengths (partial last pages), two rows
    sharing a cached prefix's pages, a prefill chunk over a cached prefix and a fresh prompt."""
    free = list(range(1, n_pages))
    rng.shuffle(free)
    take = lambda n: [free.pop() for _ in range(-(-n // PS))]  # noqa: E731
    shared = take(PS * 5)  # a 20-token prefix two requests share (radix cache)
    chunks: list[tuple[list[int], int, int]] = []
    for n in [rng.randint(1, 3), 7, 64, rng.randint(100, 300), 1, 9]:
        chunks.append((take(n), n - 1, 1))
    for extra in (3, 6):
        chunks.append((shared + take(extra), PS * 5 + extra - 1, 1))
    chunks.insert(2, (take(40), 30, 10))  # prefill chunk 30..39 over its 30 cached tokens
    chunks.append((take(12), 0, 12))  # a fresh prompt
    return chunks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_place_decode_equals_gather(seed: int) -> None:
    """The C++ kernel (pages read in place) equals the gather + SDPA path to 1e-5, on random
    page layouts with shared prefixes, partial pages and a mixed batch (prefill chunks too)."""
    if not kernels.load():
        pytest.skip("no C++ compiler: the engine runs the gather path only")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=3, head_dim=64)
    pool = KVPool(cfg, num_pages=400, page_size=PS, device=torch.device("cpu"), dtype=torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    chunks = _random_layout(rng, 400)
    t = sum(c[2] for c in chunks)
    q, k, v = torch.randn(t, 9, 64), torch.randn(t, 3, 64), torch.randn(t, 3, 64)
    gather = build_metadata(chunks, PS, torch.device("cpu"))
    in_place = build_metadata(chunks, PS, torch.device("cpu"), in_place=True)
    assert in_place.decode_rows is not None and not in_place.decode_groups and gather.decode_groups
    for layer in range(2):
        a = PagedAttention(pool, gather)(layer, q, k, v)
        b = PagedAttention(pool, in_place)(layer, q, k, v)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    decode_only = [c for c in chunks if c[2] == 1]  # the kernel's whole-batch shortcut
    n = len(decode_only)
    a = PagedAttention(pool, build_metadata(decode_only, PS, torch.device("cpu")))(0, q[:n], k[:n], v[:n])
    b = PagedAttention(pool, build_metadata(decode_only, PS, torch.device("cpu"), True))(0, q[:n], k[:n], v[:n])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_kernel_splits_long_rows_exactly() -> None:
    """A row longer than the kernel's split (PART_TOKENS) is attended in pieces whose partial
    softmaxes are merged: the same result as one piece."""
    if not kernels.load():
        pytest.skip("no C++ compiler")
    torch.manual_seed(3)
    pages = torch.randperm(199)[:130].add(1).to(torch.int32)[None]  # 130 pages of 4: 517 tokens fit
    k, v = torch.randn(800, 3, 64), torch.randn(800, 3, 64)
    q = torch.randn(1, 9, 64)
    lens = torch.tensor([517], dtype=torch.int32)
    one = torch.ops.pdserve.paged_decode(q, k, v, pages, lens, PS, 0.125, 4096)
    for part in (4, 64, 100):
        torch.testing.assert_close(torch.ops.pdserve.paged_decode(q, k, v, pages, lens, PS, 0.125, part), one,
                                   rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_engine_gathers(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               tmp_path) -> None:
    """No compiler (or a broken one): one log line, and "auto" falls back to the gather path;
    "cpp" refuses to start."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert not kernels.load_with(None)
        assert not kernels.load_with(str(tmp_path / "no-such-c++"))
        assert not kernels.load_with("/bin/false")  # a "compiler" that fails every build
    assert len(caplog.records) == 3 and all("falls back to gathering" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(kernels, "load", lambda: False)
    cfg = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=8)
    pool = KVPool(cfg, num_pages=4, page_size=PS, device=torch.device("cpu"), dtype=torch.float32)
    assert not attention.decode_in_place("auto", pool)
    assert not attention.decode_in_place("torch_native", pool)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        attention.decode_in_place("cpp", pool)
