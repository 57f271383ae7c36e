"""Paged attention over a flat mixed batch (prefill chunks + decode tokens), in plain torch.

Per forward the runner builds `AttentionMetadata` once; every layer then
  1. writes the new k/v rows into their slots of the pool,
  2. attends: each prefill chunk with SDPA (causal; against its gathered pages when it has
     a cached/computed prefix), all single-token rows together as one padded SDPA batch:

     page_table [B, P] → slots [B * P*page_size] = page*page_size + offset   (pad page 0)
     K = k[layer].index_select(slots) → [B, L, Hkv, D] → SDPA(q [B, Hq, 1, D], GQA),
     masked where position ≥ seq_len

The same code runs on CUDA; only the tensors' device changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.kv_cache import KVPool


@dataclass
class PrefillSeq:
    q_start: int  # row in the flat batch
    q_len: int
    kv_len: int  # tokens attended to (prefix + this chunk)
    kv_slots: torch.Tensor | None  # slots of all kv_len tokens; None: no prefix, use fresh k/v
    mask: torch.Tensor | None  # [q_len, kv_len] bool, when kv_slots is set


@dataclass
class AttentionMetadata:
    slots: torch.Tensor  # [T] where each new token's k/v is written
    prefills: list[PrefillSeq]
    decode_rows: torch.Tensor | None  # [B] rows of single-token sequences
    decode_slots: torch.Tensor | None  # [B * P*page_size] slots of the padded page tables
    decode_mask: torch.Tensor | None  # [B, 1, 1, P*page_size] True where attendable


def build_metadata(
    chunks: list[tuple[list[int], int, int]], page_size: int, device: torch.device
) -> AttentionMetadata:
    """chunks: (page table, start position, length) per sequence, in flat-batch order."""
    slots: list[int] = []
    prefills: list[PrefillSeq] = []
    dec_rows: list[int] = []
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    row = 0
    for pages, start, length in chunks:
        end = start + length
        slots.extend(pages[p // page_size] * page_size + p % page_size for p in range(start, end))
        if length == 1:
            dec_rows.append(row)
            dec_tables.append(pages[: -(-end // page_size)])
            dec_lens.append(end)
        elif start == 0:
            prefills.append(PrefillSeq(row, length, end, None, None))
        else:
            table = torch.tensor(pages[: -(-end // page_size)], dtype=torch.long)
            kv_slots = (table[:, None] * page_size + torch.arange(page_size)).flatten()[:end]
            qpos = torch.arange(start, end)[:, None]
            mask = torch.arange(end)[None, :] <= qpos
            prefills.append(PrefillSeq(row, length, end, kv_slots.to(device), mask.to(device)))
        row += length
    meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device), prefills, None, None, None)
    if dec_rows:
        width = max(len(t) for t in dec_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.long)
        lens = torch.tensor(dec_lens, dtype=torch.long)
        mask = torch.arange(width * page_size)[None, :] < lens[:, None]
        meta.decode_rows = torch.tensor(dec_rows, dtype=torch.long, device=device)
        meta.decode_slots = (table[:, :, None] * page_size + torch.arange(page_size)).flatten().to(device)
        meta.decode_mask = mask[:, None, None, :].to(device)
    return meta


class PagedAttention:
    """The `attn(layer, q, k, v)` callable handed to the model for one forward."""

    def __init__(self, pool: KVPool, meta: AttentionMetadata) -> None:
        self.pool = pool
        self.meta = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, pool = self.meta, self.pool
        pool.write(layer, meta.slots, k, v)
        out = torch.empty_like(q)
        for s in meta.prefills:
            rows = slice(s.q_start, s.q_start + s.q_len)
            # [1, H, L, D] views: SDPA's fused CPU kernel needs the batch dim (3-D falls back
            # to the slow math path, ~10x slower here)
            qs = q[rows].transpose(0, 1).unsqueeze(0)
            if s.kv_slots is None:
                ks, vs = k[rows], v[rows]
                mask, causal = None, True
            else:
                ks, vs = pool.k[layer].index_select(0, s.kv_slots), pool.v[layer].index_select(0, s.kv_slots)
                mask, causal = s.mask, False
            o = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, is_causal=causal, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self._decode(layer, q[meta.decode_rows])
        return out

    def _decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        meta, pool = self.meta, self.pool
        assert meta.decode_slots is not None and meta.decode_mask is not None
        b, hq, d = q.shape
        hkv = pool.k.shape[2]
        # index_select on flat slots is ~5x faster on CPU than advanced indexing by page
        ks = pool.k[layer].index_select(0, meta.decode_slots).view(b, -1, hkv, d).transpose(1, 2)
        vs = pool.v[layer].index_select(0, meta.decode_slots).view(b, -1, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=meta.decode_mask, enable_gqa=True)
        return o.view(b, hq, d)
