"""Multi-head latent attention (DeepSeek-V2/V3): the model's side. Pages stay the runner's.

Per token (H heads, r = kv_lora_rank, n/p = qk_nope/qk_rope head dims, dv = v_head_dim):

    x ─ q_proj (or q_a_proj ─ q_a_layernorm ─ q_b_proj) ─▶ q [H, n + p] = [q_nope | q_pe]
    x ─ kv_a_proj_with_mqa ─▶ [c_kv (r) | k_pe (p)];  c_kv ─ kv_a_layernorm
    (both projections of x run as one GEMM, fused_qkv_a_proj_with_mqa, built at load: absorb())
    RoPE on q_pe (every head) and k_pe (one, shared by the heads)
    latent = [c_kv | k_pe]  (r + p values: ALL the cache holds for this token, in every layer)
    out [H, dv] = attn.latent(layer, q_nope, q_pe, latent, heads) ─ o_proj

`heads` (LatentHeads, built once at load from kv_b_proj [H*(n+dv), r]) lets the attention use
either form:

    expanded  k = [c_kv W_UK[h]^T | k_pe], v = c_kv W_UV[h]^T   per head  (prefill: many queries)
    absorbed  q_lat[h] = q_nope[h] W_UK[h]          [H, r]                (decode: one query;
              scores = q_lat . c_kv + q_pe . k_pe,   o_lat = softmax . c_kv   attends over the
              out[h] = o_lat[h] W_UV[h]^T            [H, dv]                  latents directly)

with W_UK[h] = kv_b_proj rows [h*(n+dv), h*(n+dv)+n) and W_UV[h] the next dv rows. Both forms
give the same scores (q_nope . W_UK c = (W_UK^T q_nope) . c); the softmax scale is
1/sqrt(n + p) (x mscale^2 under YaRN: rope.softmax_scale).

DeepSeek's checkpoints lay the rope dims out in (x0, x1) pairs; HF rotates them interleaved.
Rotating pairs (2i, 2i+1) equals rotate_half on [evens | odds], so the rope rows of q_proj /
q_b_proj and kv_a_proj_with_mqa are permuted to that order once at load (`deinterleave_rope`):
q_pe . k_pe is unchanged by permuting both alike, and the cache holds k_pe in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pdserve.model.config import ModelConfig
from pdserve.model.linear import Linear
from pdserve.model.llama import RMSNorm
from pdserve.model.moe_config import MLAConfig
from pdserve.model.rope import Rotation, softmax_scale
from pdserve.model.tp import Collectives, NoCollectives

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm keep RMSNorm's default eps, not the config's


@dataclass(frozen=True)
class LatentHeads:
    """One layer's latent -> per-head projections, for either form of the attention."""

    kv_b_proj: Linear  # [H*(n+dv), r] (the expanded form calls it: prepacked on CPU)
    w_uk: torch.Tensor  # [H, n, r]   absorbed: q_lat = q_nope @ w_uk
    w_uv: torch.Tensor  # [H, r, dv]  absorbed: out = o_lat @ w_uv
    nope: int
    rope: int
    scale: float  # the softmax scale

    @classmethod
    def absorb(cls, kv_b_proj: Linear, mla: MLAConfig, heads: int, scale: float) -> LatentHeads:
        w = kv_b_proj.weight.detach().view(heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        return cls(kv_b_proj, w[:, : mla.qk_nope_head_dim].contiguous(),
                   w[:, mla.qk_nope_head_dim:].transpose(1, 2).contiguous(),
                   mla.qk_nope_head_dim, mla.qk_rope_head_dim, scale)

    @property
    def rank(self) -> int:
        return self.w_uk.shape[2]

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [N, r + p] -> k [N, H, n + p], v [N, H, dv]."""
        n, h = latent.shape[0], self.w_uk.shape[0]
        c_kv, k_pe = latent.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(n, h, -1)
        k = torch.cat((kv[..., : self.nope], k_pe.unsqueeze(1).expand(n, h, self.rope)), dim=-1)
        return k, kv[..., self.nope:]

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [B, H, n], q_pe [B, H, p] -> the query against latents [B, H, r + p]."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
        return torch.cat((q_lat, q_pe), dim=-1)

    def values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [B, H, r] (attention-weighted c_kv per head) -> [B, H, dv]."""
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv).transpose(0, 1)


class LatentAttnFn(Protocol):
    """What an MLA layer needs of the attention the runner passes (engine/attention.py)."""

    def latent(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               heads: LatentHeads) -> torch.Tensor:
        """Cache `latent` [T, r + p] for this forward's tokens; attend -> [T, H, dv]."""
        ...


class MLAttention(nn.Module):
    """`cfg` is this rank's (model/tp.py): under TP its H heads are a slice, the latent
    projections whole, and o_proj's partial sums are all-reduced (`comm`)."""

    def __init__(self, cfg: ModelConfig, layer: int, comm: Collectives = NoCollectives()) -> None:
        super().__init__()
        assert cfg.mla is not None
        m, h, hidden = cfg.mla, cfg.num_attention_heads, cfg.hidden_size
        self.layer, self.mla, self.h, self.comm = layer, m, h, comm
        if m.q_lora_rank is None:
            self.q_proj = Linear(hidden, h * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, m.latent_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(h * m.v_head_dim, hidden, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg, m.qk_head_dim)
        self.heads: LatentHeads | None = None  # absorb(), once the weights are in
        self.q_width = m.q_lora_rank or h * m.qk_head_dim  # what the fused input projection yields for q

    def absorb(self) -> None:
        """Once the HF-named weights are in: the per-head projections of kv_b_proj, and the two
        projections of x (q_a_proj or q_proj, kv_a_proj_with_mqa) fused into one GEMM."""
        self.heads = LatentHeads.absorb(self.kv_b_proj, self.mla, self.h, self.scale)
        first = self.q_proj if self.mla.q_lora_rank is None else self.q_a_proj
        kv_a = self.kv_a_proj_with_mqa
        w = torch.cat((first.weight, kv_a.weight))
        fused = Linear(w.shape[1], w.shape[0], bias=first.bias is not None or kv_a.bias is not None,
                       device=w.device, dtype=w.dtype)
        fused.weight.data.copy_(w)
        if fused.bias is not None:
            fused.bias.data.copy_(torch.cat([b.bias if b.bias is not None else w.new_zeros(b.weight.shape[0])
                                             for b in (first, kv_a)]))
        self.fused_qkv_a_proj_with_mqa = fused.requires_grad_(False)
        del self.kv_a_proj_with_mqa
        if self.mla.q_lora_rank is None:
            del self.q_proj
        else:
            del self.q_a_proj

    def forward(self, x: torch.Tensor, rot: Rotation, attn: LatentAttnFn) -> torch.Tensor:
        assert self.heads is not None, "MLAttention.absorb() runs after the weights load"
        t, h, m = x.shape[0], self.h, self.mla
        q, c_kv, k_pe = self.fused_qkv_a_proj_with_mqa(x).split([self.q_width, m.kv_lora_rank, m.qk_rope_head_dim],
                                                                dim=-1)
        if m.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.reshape(t, h, m.qk_head_dim)
        pe = rot.apply(torch.cat((q[..., m.qk_nope_head_dim:], k_pe.unsqueeze(1)), dim=1))  # q heads + k: one pass
        latent = torch.cat((self.kv_a_layernorm(c_kv), pe[:, h]), dim=-1)
        out = attn.latent(self.layer, q[..., : m.qk_nope_head_dim], pe[:, :h], latent, self.heads)
        return self.comm.all_reduce(self.o_proj(out.reshape(t, h * m.v_head_dim)))


def deinterleave_rope(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A checkpoint tensor with its rope rows in (x0, x1) pair order -> [evens | odds] order
    (see the module docstring); others unchanged."""
    m = cfg.mla
    if m is None or not m.rope_interleave:
        return tensor
    p = m.qk_rope_head_dim
    perm = torch.cat((torch.arange(0, p, 2), torch.arange(1, p, 2)))
    if name.endswith((".self_attn.q_proj.weight", ".self_attn.q_b_proj.weight")):
        per_head = tensor.view(-1, m.qk_head_dim, tensor.shape[-1])  # this rank's heads (model/tp.py)
        rope = per_head[:, m.qk_nope_head_dim:].index_select(1, perm)
        return torch.cat((per_head[:, : m.qk_nope_head_dim], rope), dim=1).view_as(tensor)
    if ".self_attn.kv_a_proj_with_mqa." in name:
        return torch.cat((tensor[: m.kv_lora_rank], tensor[m.kv_lora_rank:].index_select(0, perm)))
    return tensor
