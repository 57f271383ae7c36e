"""Llama-family decoder over a flat token batch.

The model sees one flat batch of T tokens (prefill chunks and decode tokens mixed) and calls
`attn(layer, q, k, v)` for attention, a callable the runner supplies: it writes k/v into the
paged KV cache and attends over each sequence's pages. The model itself knows no pages.
q/k/v and gate/up are fused into single matmuls at load time (fewer, larger GEMMs on CPU).
Parameter names follow Hugging Face so a safetensors folder loads by name.
With tensor parallelism (model/tp.py) each rank builds the slice it computes and calls the
collectives passed in: one all-reduce after o_proj and one after down_proj per layer, one after
the embedding, and a gather of the sampled rows' logits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.model.config import ModelConfig
from pdserve.model.linear import Linear, linear, linear_fp16, pack_fp16, prepack
from pdserve.model.rope import RotaryEmbedding, Rotation
from pdserve.model.tp import Collectives, NoCollectives, TPShard

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's LlamaRMSNorm op for op (F.rms_norm is 2x slower on one row with 2 threads here)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, comm: Collectives) -> None:
        super().__init__()
        self.layer = layer
        self.comm = comm
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        self.o_proj = Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rot: Rotation, attn: AttnFn) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([(self.hq + self.hkv) * self.d, self.hkv * self.d], dim=-1)
        qk = qk.view(t, self.hq + self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.hq]), self.k_norm(qk[:, self.hq:])), dim=1)
        qk = rot.apply(qk)  # q and k heads rotated in one pass
        q, k = qk[:, : self.hq], qk[:, self.hq:]
        out = attn(self.layer, q, k, v.view(t, self.hkv, self.d))  # [T, Hq, D]
        return self.comm.all_reduce(self.o_proj(out.reshape(t, self.hq * self.d)))


class MLP(nn.Module):
    """SwiGLU with gate/up fused (also an MoE model's dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int, comm: Collectives = NoCollectives()) -> None:
        super().__init__()
        self.comm = comm
        self.inter = inter
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(self.comm.mlp_in(x)).split(self.inter, dim=-1)
        return self.comm.mlp_out(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    """Pre-norm residual block; other families (model/moe_lm.py) pass their own attention / MLP."""

    def __init__(self, cfg: ModelConfig, layer: int, attn_comm: Collectives, mlp_comm: Collectives,
                 self_attn: nn.Module | None = None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = self_attn or Attention(cfg, layer, attn_comm)
        self.mlp = mlp or MLP(cfg.hidden_size, cfg.intermediate_size, mlp_comm)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rot: Rotation, attn: AttnFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rot, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class VocabEmbedding(nn.Module):
    """The rows [start, stop) of the embedding; ids outside look up zeros, summed over ranks."""

    def __init__(self, start: int, stop: int, dim: int, comm: Collectives, whole: bool) -> None:
        super().__init__()
        self.start, self.stop, self.comm, self.whole = start, stop, comm, whole
        self.weight = nn.Parameter(torch.empty(stop - start, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.stop)
        x = F.embedding((ids - self.start).clamp_(0, self.stop - self.start - 1), self.weight)
        return self.comm.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))


MakeLayer = Callable[[ModelConfig, int, Collectives, Collectives], nn.Module]  # (local cfg, index, attn, mlp comm)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPShard, comm: Collectives, make_layer: MakeLayer = DecoderLayer) -> None:
        super().__init__()
        local = tp.local_config(cfg)
        attn_comm = NoCollectives() if tp.dp_attention else comm  # DP attention: whole on every rank
        self.embed_tokens = VocabEmbedding(*tp.vocab_range(cfg), cfg.hidden_size, attn_comm, whole=tp.attn_size == 1)
        self.layers = nn.ModuleList(make_layer(local, i, attn_comm, comm) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(tokens, positions, attn) -> hidden [T, H]; logits(hidden) -> [N, V] (None on tp
    ranks other than 0)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPShard = TPShard(),
                 comm: Collectives = NoCollectives()) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.comm = NoCollectives() if tp.dp_attention else comm  # the LM head's
        self.local = tp.local_config(cfg)  # the sizes this rank computes
        self.model = LlamaModel(cfg, tp, comm, self.make_layer)
        self.rope = RotaryEmbedding(cfg, max_positions)
        vocab = cfg.vocab_size // tp.attn_size
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, vocab, bias=False)
        self.tied_head: torch.Tensor | None = None  # prepacked copy of a tied embedding (prepack)
        self.tied_fp16: torch.ScriptObject | None = None  # fp16 copy of a tied embedding (quantize)

    def make_layer(self, cfg: ModelConfig, layer: int, attn_comm: Collectives, mlp_comm: Collectives) -> nn.Module:
        return DecoderLayer(cfg, layer, attn_comm, mlp_comm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rot = self.rope(positions)
        for layer in self.model.layers:
            x = layer(x, rot, attn)
        return self.model.norm(x)

    def idle_forward(self, dtype: torch.dtype, device: torch.device) -> None:
        """DP attention, a rank with no tokens this step: join every layer's MLP collectives
        with zero rows, so that the ranks that have tokens get their rows back."""
        empty = torch.empty(0, self.config.hidden_size, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.mlp(empty)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.lm_head is not None:
            return self.comm.gather_vocab(self.lm_head(hidden).float())
        if self.tied_fp16 is not None:
            return self.comm.gather_vocab(linear_fp16(hidden, self.tied_fp16))
        weight = self.model.embed_tokens.weight if self.tied_head is None else self.tied_head
        return self.comm.gather_vocab(linear(hidden, weight).float())

    def prepack(self) -> int:
        """Swap every GEMM weight for its CPU-prepacked form (model/linear.py); a tied LM head
        gets a packed copy (the embedding lookup keeps the dense rows). Returns how many."""
        packed = sum(m.pack() for m in self.modules() if isinstance(m, Linear))
        if self.lm_head is None:
            self.tied_head = prepack(self.model.embed_tokens.weight)
            packed += self.tied_head is not None
        return packed

    def quantize(self) -> int:
        """fp16 weights for every GEMM (model/linear.py), a tied LM head included (the embedding
        lookup keeps its fp32 rows). Returns how many."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.quantize()
        if self.lm_head is None:
            self.tied_fp16 = pack_fp16(self.model.embed_tokens.weight)
        return len(linears) + (self.lm_head is None)

    # ---- weights ---------------------------------------------------------------------------
    _FUSED = {  # HF name fragment -> (fused parameter fragment, shard index)
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def keep_fp32(self) -> None:
        """After the cast to the compute dtype: parts that must stay fp32 go back (none here)."""

    def after_load(self) -> None:
        """Once every weight is in, before prepacking: weights derived from others (none here)."""

    def hf_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor loads into (HF names, fused ones resolved later);
        None: not one of ours."""
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: some checkpoints store a copy
        return None if "rotary_emb" in name else name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (already sliced to this rank: TPShard.weight_slice): a tensor
        whose name is a parameter loads as is, the others are pieces of fused parameters."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for hf, tensor in weights:
            name = self.hf_name(hf)
            if name is None:
                continue
            target = params.get(name)
            if target is not None:
                target.data.copy_(tensor)
                seen.add(name)
                continue
            piece = self.load_piece(name, tensor, params)
            if piece is None:
                raise KeyError(f"unexpected weight {hf!r} in checkpoint")
            seen.add(piece)
        self._check_complete(params, seen)

    def load_piece(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> str | None:
        """Copy `tensor` into its slot of a fused parameter; returns "param#piece" (None: no such)."""
        fused = next((f for f in self._FUSED if f".{f}." in name), None)
        if fused is None:
            return None
        new_frag, shard = self._FUSED[fused]
        pname = name.replace(fused, new_frag)
        target = params.get(pname)
        if target is None:
            return None
        offset, size = self._shard_range(new_frag, shard, target)
        target.data[offset:offset + size].copy_(tensor)
        return f"{pname}#{shard}"

    def _shard_range(self, frag: str, shard: int, target: nn.Parameter) -> tuple[int, int]:
        if frag == "gate_up_proj":
            half = target.shape[0] // 2
            return shard * half, half
        c = self.local
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][shard]

    def pieces(self, name: str) -> int:
        """How many checkpoint tensors fill parameter `name`."""
        return 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 1

    def _check_complete(self, params: dict[str, nn.Parameter], seen: set[str]) -> None:
        missing = []
        for name in params:
            n = self.pieces(name)
            if n == 1:
                missing += [] if name in seen else [name]
            else:
                missing += [f"{name}#{i}" for i in range(n) if f"{name}#{i}" not in seen]
        if missing:
            raise KeyError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
