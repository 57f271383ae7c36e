"""Paged attention over a flat mixed batch (prefill chunks + decode tokens).

Per forward the runner builds `AttentionMetadata` once; every layer then
  1. writes the new k/v rows into their slots of the pool,
  2. attends: each prefill chunk with SDPA (causal; against its gathered pages when it has
     a cached/computed prefix), the single-token rows either
     in place: one call of the C++ kernel `torch.ops.pdserve.paged_decode` (engine/kernels),
     which walks each row's page table and reads every KV byte once, or
     by gathering (the torch-only path: no compiler, a dtype other than fp32, CUDA): a few
     padded SDPA batches over pages copied out of the pool:

     page_table [B, P] (pad page 0) → pages [B * P]
     K = k[layer] viewed as [num_pages, page_size*Hkv*D] .index_select(pages)
       → [B, L = P*page_size, Hkv, D] → SDPA(q [B, Hq, 1, D], GQA), masked where position ≥ seq_len

     Padding costs B x P pages of gather per layer, so rows are sorted by length and cut into
     groups whose padded size stays within DECODE_PAD_WASTE x their real size:

        widths (pages) sorted: 3 4 4 5 | 13 14 | 63        -> 3 groups, 3 SDPA calls per layer

MLA models call `latent(layer, q_nope, q_pe, latent, heads)` instead (model/mla.py draws the
two forms); the pool holds one latent row per token (r = kv_lora_rank, p = rope dims, H heads):

    write      latent [T, r+p] -> pool.kv[layer] slots
    prefill    L = chunk (+ its cached prefix, gathered from the pool by slot)
               latents [L, r+p] ─ heads.expand (kv_b_proj) ─▶ k [L, H, n+p], v [L, H, dv]
               SDPA(q = [q_nope | q_pe] [1, H, Lq, n+p], k, v) ─▶ [Lq, H, dv]
    decode     q = heads.absorb_query(q_nope, q_pe)  [B, H, r+p]   (W_UK folded into q)
               latents = whole pages, as above        [B, P*page_size, r+p]
               SDPA(q as [B, 1, H, r+p]: the H heads are the query rows of ONE kv head,
                    k = latents [B, 1, L, r+p], v = latents[..., :r] [B, 1, L, r])
                 ─▶ o_lat [B, H, r] ─ heads.values (W_UV) ─▶ [B, H, dv]

MLA's latent pools keep the gather path for decode (the kernel reads K/V pools only).
The same code runs on CUDA (gather path); only the tensors' device changes.

Why a C++ kernel for decode (issue 29, one layer of the bundled model's shape, 9/3 heads x 64,
page 16; interleaved A/B in one process, medians, a 2-core box at load 10-14, so read ratios):
gather + SDPA -> kernel: batch 1 x 256 tokens 0.68x, x 2048 0.5-0.7x; batch 64 x 256 0.36-0.46x,
x 1024 0.21-0.23x, x 2048 0.19-0.22x. FlexAttention on CPU (inductor C++, the page table as a
BlockMask of 16-token blocks, full pages + a masked last page) equals it to 1e-6 but the kernel
took 0.31x its time at batch 1 x 2048 and 0.09-0.14x at batch 64 (plus 30-60 s of compile per
shape). No maintained CPU paged kernel fits: vLLM-CPU's is inside vLLM's own extension.
Prefill chunks keep SDPA over gathered pages: their attention is O(q x kv) and compute-bound
(SDPA's blocked kernel), the gather O(kv), so reading pages in place would not pay there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.kv_cache import KVPool, LatentPool, Pool
from pdserve.model.mla import LatentHeads


def decode_in_place(backend: str, pool: Pool) -> bool:
    """Whether decode rows use the C++ kernel: "auto" where it loads (CPU, fp32 K/V pool), "cpp"
    insists (ValueError where it cannot), "torch_native" never (the gather path). MLA's latent
    pool always gathers: the kernel walks K/V pools of Hkv heads only."""
    if backend == "torch_native":
        return False
    if not isinstance(pool, KVPool):
        if backend == "cpp":
            raise ValueError("--attention-backend cpp reads K/V pools only; an MLA model's latent pool gathers "
                             "(--attention-backend auto or torch_native)")
        return False
    fits = pool.k.device.type == "cpu" and pool.k.dtype == torch.float32
    if fits and kernels.load():
        return True
    if backend == "cpp":
        raise ValueError("--attention-backend cpp needs a CPU float32 KV pool and a C++ compiler "
                         "(see the log line above)" if fits else "--attention-backend cpp needs a CPU float32 KV pool")
    return False


@dataclass
class PrefillSeq:
    q_start: int  # row in the flat batch
    q_len: int
    kv_len: int  # tokens attended to (prefix + this chunk)
    kv_slots: torch.Tensor | None  # slots of all kv_len tokens; None: no prefix, use fresh k/v
    mask: torch.Tensor | None  # [q_len, kv_len] bool, when kv_slots is set


DECODE_PAD_WASTE = 1.5  # a decode group's padded pages may be at most this x its real pages


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [B] rows of single-token sequences in the flat batch
    pages: torch.Tensor  # [B * P] the padded page tables, flat
    mask: torch.Tensor  # [B, 1, 1, P*page_size] True where attendable


@dataclass
class DecodeRows:
    """Every single-token row, for the in-place kernel: no padding is read, so no grouping."""

    rows: torch.Tensor  # [B] rows in the flat batch
    page_table: torch.Tensor  # [B, P] int32, padded with page 0
    seq_lens: torch.Tensor  # [B] int32, tokens attended (this one included)


PART_TOKENS = 512  # the kernel splits a row's context into items of this many tokens (threads share rows)


@dataclass
class AttentionMetadata:
    slots: torch.Tensor  # [T] where each new token's k/v is written
    prefills: list[PrefillSeq]
    decode_groups: list[DecodeGroup]  # gather path
    decode_rows: DecodeRows | None = None  # in-place path (then decode_groups is empty)


def group_by_width(widths: list[int], waste: float = DECODE_PAD_WASTE) -> list[list[int]]:
    """Indices of `widths` cut into groups, ascending by width, such that each group's padded
    size (len x max width) stays within `waste` x the sum of its widths."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(widths)), key=widths.__getitem__):
        w = widths[i]
        if groups and (len(groups[-1]) + 1) * w <= waste * (total + w):
            groups[-1].append(i)
            total += w
        else:
            groups.append([i])
            total = w
    return groups


def _decode_group(rows: list[int], tables: list[list[int]], lens: list[int], page_size: int,
                  device: torch.device) -> DecodeGroup:
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    mask = torch.arange(width * page_size)[None, :] < torch.tensor(lens, dtype=torch.long)[:, None]
    return DecodeGroup(torch.tensor(rows, dtype=torch.long, device=device), table.flatten().to(device),
                       mask[:, None, None, :].to(device))


def decode_rows(rows: list[int], tables: list[list[int]], lens: list[int], device: torch.device) -> DecodeRows:
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return DecodeRows(torch.tensor(rows, dtype=torch.long, device=device), table.to(device),
                      torch.tensor(lens, dtype=torch.int32, device=device))


def build_metadata(
    chunks: list[tuple[list[int], int, int]], page_size: int, device: torch.device, in_place: bool = False
) -> AttentionMetadata:
    """chunks: (page table, start position, length) per sequence, in flat-batch order;
    in_place: decode rows go to the C++ kernel (engine/kernels loaded), else the gather path."""
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
    slot_t = torch.tensor(slots, dtype=torch.long, device=device)
    if in_place and dec_rows:
        return AttentionMetadata(slot_t, prefills, [], decode_rows(dec_rows, dec_tables, dec_lens, device))
    groups = [_decode_group([dec_rows[i] for i in g], [dec_tables[i] for i in g], [dec_lens[i] for i in g],
                            page_size, device)
              for g in group_by_width([len(t) for t in dec_tables])]
    return AttentionMetadata(slot_t, prefills, groups)


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: DecodeRows, page_size: int) -> torch.Tensor:
    """q [B, Hq, D] against each row's pages of k/v [slots, Hkv, D] (the C++ kernel)."""
    return torch.ops.pdserve.paged_decode(q, k, v, d.page_table, d.seq_lens, page_size, q.shape[-1] ** -0.5,
                                          PART_TOKENS)


class PagedAttention:
    """The attention handed to the model for one forward: `attn(layer, q, k, v)` over a KVPool,
    `attn.latent(...)` over a LatentPool (MLA)."""

    def __init__(self, pool: Pool, meta: AttentionMetadata) -> None:
        self.pool = pool
        self.meta = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, pool = self.meta, self.pool
        assert isinstance(pool, KVPool)
        pool.write(layer, meta.slots, k, v)
        d = meta.decode_rows
        if d is not None and d.rows.shape[0] == q.shape[0]:  # decode-only: no row gather/scatter
            return paged_decode(q, pool.k[layer], pool.v[layer], d, pool.page_size)
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
        for g in meta.decode_groups:
            out[g.rows] = self._decode(layer, q[g.rows], g)
        if d is not None:
            out[d.rows] = paged_decode(q[d.rows], pool.k[layer], pool.v[layer], d, pool.page_size)
        return out

    def latent(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               heads: LatentHeads) -> torch.Tensor:
        meta, pool = self.meta, self.pool
        assert isinstance(pool, LatentPool)
        pool.write(layer, meta.slots, latent)
        out = q_nope.new_empty(*q_nope.shape[:2], heads.w_uv.shape[2])
        rows_of = pool.kv[layer].view(pool.kv.shape[1], -1)  # [slots, r+p]
        for s in meta.prefills:
            rows = slice(s.q_start, s.q_start + s.q_len)
            lat = latent[rows] if s.kv_slots is None else rows_of.index_select(0, s.kv_slots)
            k, v = heads.expand(lat)
            q = torch.cat((q_nope[rows], q_pe[rows]), dim=-1)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                attn_mask=s.mask, is_causal=s.kv_slots is None, scale=heads.scale)
            out[rows] = o[0].transpose(0, 1)
        for g in meta.decode_groups:
            q = heads.absorb_query(q_nope[g.rows], q_pe[g.rows])  # [B, H, r+p]
            b, h, width = q.shape
            lat = pool.kv[layer].view(pool.num_pages, -1).index_select(0, g.pages).view(b, 1, -1, width)
            o = F.scaled_dot_product_attention(q.unsqueeze(1), lat, lat[..., : heads.rank], attn_mask=g.mask,
                                               scale=heads.scale)  # [B, 1, H, r]
            out[g.rows] = heads.values(o.view(b, h, heads.rank))
        return out

    def _decode(self, layer: int, q: torch.Tensor, g: DecodeGroup) -> torch.Tensor:
        pool = self.pool
        assert isinstance(pool, KVPool)
        b, hq, d = q.shape
        hkv = pool.k.shape[2]
        # index_select of whole pages (rows of page_size*Hkv*D): ~4x faster on CPU than
        # advanced indexing, a third faster than selecting slot by slot
        pages = pool.num_pages
        ks = pool.k[layer].view(pages, -1).index_select(0, g.pages).view(b, -1, hkv, d).transpose(1, 2)
        vs = pool.v[layer].view(pages, -1).index_select(0, g.pages).view(b, -1, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=g.mask, enable_gqa=True)
        return o.view(b, hq, d)
