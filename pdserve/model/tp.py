"""Tensor parallelism for the model: which slice of each weight a rank holds, and the two
collectives the sliced layers need (passed in, like attention: the model knows no process group).

Slicing (Megatron style; Hq query heads, Hkv KV heads, I intermediate, V vocab, tp ranks):

    qkv_proj  column-parallel  rank r keeps   q heads [r*Hq/tp, (r+1)*Hq/tp)
                                              kv heads  Hkv >= tp: [r*Hkv/tp, (r+1)*Hkv/tp)
                                                        Hkv <  tp: the one its q heads read,
                                                        (r*Hkv)//tp  (replicated on tp/Hkv ranks)
    o_proj    row-parallel     the input columns of its q heads; partial sums -> all_reduce
    gate_up   column-parallel  gate rows [r*I/tp, (r+1)*I/tp) and the same rows of up
    down_proj row-parallel     the matching input columns -> all_reduce
    embed     vocab-parallel   rows [r*V/tp, (r+1)*V/tp); other ids look up zeros -> all_reduce
    lm_head   vocab-parallel   the same rows (tied: the embedding's); logits -> gather_vocab
    norms     replicated

Example Hq=8, Hkv=2, tp=4 (head_dim d; rows of the fused qkv_proj on each rank):

    rank        0           1           2           3
    q heads   0 1         2 3         4 5         6 7
    kv head    0           0           1           1
    qkv rows  [q0 q1|k0|v0] [q2 q3|k0|v0] [q4 q5|k1|v1] [q6 q7|k1|v1]   (each block d rows)

So the KV pool of a rank holds `kv_heads` heads starting at global head `kv_start`.

DP attention (`TPShard(rank, size, dp_attention=True)`, SGLang's --enable-dp-attention with
tp == dp): every rank keeps the whole attention, embedding, norms and LM head (its own requests,
its own KV pool with every KV head) and only the MLP is sliced as above. Per layer the MLP's
input is every rank's rows, gathered and padded to the largest rank's count; the row-parallel
down_proj's partial sums are reduce-scattered back, each rank keeping its own rows:

    rank 0 rows  [a0 a1 a2]       mlp_in: all_gather, padded to 3   [a0 a1 a2|b0 -- --]
    rank 1 rows  [b0]             gate_up/down on the slice I/size  (partial sums, 6 rows)
                                  mlp_out: reduce_scatter -> rank 0 [a0 a1 a2], rank 1 [b0]

Mixture-of-experts and latent-attention models (model/moe_lm.py) on the same ranks:

    MLA under TP   q heads split (q_proj / q_b_proj rows, kv_b_proj's per-head rows, o_proj's
                   columns); the latent projections (q_a_proj, kv_a_proj_with_mqa) and so the
                   latent itself are WHOLE on every rank: each rank's pool holds every token's
                   latent (the same bytes tp times: why DP attention exists for MLA)
    sparse layer   TP-MoE (expert_parallel False): every expert on every rank, its I sliced as a
                   dense MLP's; EP (expert_parallel True, SGLang's --ep-size == tp size): rank r
                   holds whole experts [r*E/n, (r+1)*E/n) (parallel/ep.py), none sliced
    shared experts sliced with the routed part's reduction (mlp_out), except under DP attention
                   with EP, where each rank runs them whole on its own tokens (no reduction)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from pdserve.model.config import ModelConfig
from pdserve.model.moe_config import MoEConfig

_EXPERT = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.")  # a routed expert's GEMM
_SHARED = (".shared_expert.", ".shared_experts.")  # Qwen2-MoE's, DeepSeek's
_DOWN = (".down_proj.", ".w2.")  # row-parallel: sliced along the input (dim 1); the others along dim 0


class Collectives(Protocol):
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks (every rank gets the sum)."""
        ...

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each rank's [N, V/tp] logits -> [N, V] on rank 0 (None on the other ranks)."""
        ...

    def mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        """The rows the sliced MLP computes: this rank's own (TP), every rank's (DP attention)."""
        ...

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        """The MLP's partial sums -> this rank's rows, summed over the ranks."""
        ...

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Of mlp_in's rows (or a tensor row-aligned with them): this rank's own tokens' (DP
        attention: its block of the gather, padding dropped; else all of them)."""
        ...


class NoCollectives:
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        return x

    def mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the dimension tp does not divide and the sizes that would work."""
    if tp < 1:
        raise ValueError(f"tp size must be >= 1, got {tp}")
    kv = cfg.num_key_value_heads
    ok = [t for t in _divisors(cfg.num_attention_heads)
          if (kv % t == 0 or t % kv == 0) and cfg.intermediate_size % t == 0 and cfg.vocab_size % t == 0]
    dims = (("num_attention_heads", cfg.num_attention_heads, cfg.num_attention_heads % tp == 0),
            ("num_key_value_heads", kv, kv % tp == 0 or tp % kv == 0),
            ("intermediate_size", cfg.intermediate_size, cfg.intermediate_size % tp == 0),
            ("vocab_size", cfg.vocab_size, cfg.vocab_size % tp == 0))
    for name, size, fits in dims:
        if not fits:
            how = "divide it or be a multiple of it" if name == "num_key_value_heads" else "divide it"
            raise ValueError(f"tp size {tp} does not fit the model: {name} is {size} (tp must {how}); "
                             f"tp sizes that work for this model: {ok}")


@dataclass(frozen=True)
class TPShard:
    rank: int = 0
    size: int = 1
    dp_attention: bool = False  # only the MLP is sliced; attention, embedding and head are whole
    expert_parallel: bool = False  # a sparse layer's routed experts divided over the ranks (EP), not sliced

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank {self.rank} out of range for tp size {self.size}")

    @property
    def attn_size(self) -> int:
        """Ranks the attention, embedding and LM head are sliced over (1 under DP attention)."""
        return 1 if self.dp_attention else self.size

    def attention(self) -> TPShard:
        """The shard of the whole-attention parts: this one, or a whole one under DP attention."""
        return TPShard() if self.dp_attention else self

    def q_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        if self.dp_attention:
            return 0, cfg.num_attention_heads
        n = cfg.num_attention_heads // self.size
        return self.rank * n, n

    def kv_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        """(first global KV head, count) this rank keeps; MLA: the one latent "head", on every rank."""
        kv = cfg.num_key_value_heads
        if cfg.mla is not None:
            return 0, 1
        if self.dp_attention:
            return 0, kv
        if kv >= self.size:
            return self.rank * (kv // self.size), kv // self.size
        return self.rank * kv // self.size, 1

    def _part(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"tp size {self.size} does not fit the model: {what} is {n} (tp must divide it)")
        return n // self.size

    def local_moe(self, moe: MoEConfig) -> MoEConfig:
        """The sparse layers' sizes on this rank: experts' I sliced (TP-MoE) or whole (EP); the
        shared experts' sliced, except whole under DP attention with EP (see the module docstring)."""
        if self.size == 1:
            return moe
        inter = moe.intermediate_size if self.expert_parallel else self._part(moe.intermediate_size,
                                                                              "moe_intermediate_size")
        shared = moe.shared_intermediate_size
        if not (self.dp_attention and self.expert_parallel):
            shared = self._part(shared, "the shared experts' intermediate size")
        return replace(moe, intermediate_size=inter, shared_intermediate_size=shared)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of the slice this rank computes (the vocabulary stays whole)."""
        if self.size == 1:
            return cfg
        if self.dp_attention:
            if cfg.intermediate_size % self.size:
                raise ValueError(f"dp attention size {self.size} does not divide intermediate_size "
                                 f"{cfg.intermediate_size}")
            moe = None if cfg.moe is None else self.local_moe(cfg.moe)
            return replace(cfg, intermediate_size=cfg.intermediate_size // self.size, moe=moe)
        if cfg.mla is None:
            check_tp(cfg, self.size)
            kv = self.kv_heads(cfg)[1]
        else:  # q heads split, the latent whole (kv heads mean nothing to the cache)
            heads = self._part(cfg.num_attention_heads, "num_attention_heads")
            self._part(cfg.vocab_size, "vocab_size")
            kv = heads
        inter = self._part(cfg.intermediate_size, "intermediate_size")
        moe = None if cfg.moe is None else self.local_moe(cfg.moe)
        return replace(cfg, num_attention_heads=self.q_heads(cfg)[1], num_key_value_heads=kv,
                       intermediate_size=inter, moe=moe)

    def vocab_range(self, cfg: ModelConfig) -> tuple[int, int]:
        if self.dp_attention:
            return 0, cfg.vocab_size
        n = cfg.vocab_size // self.size
        return self.rank * n, (self.rank + 1) * n

    def _rows(self, n: int, name: str) -> tuple[int, int, int]:
        """This rank's n-wide block of a GEMM's output rows, or of a row-parallel one's input columns."""
        dim = 1 if any(d in name for d in _DOWN) else 0
        return dim, self.rank * n, (self.rank + 1) * n

    def _moe_slice(self, moe: MoEConfig, name: str) -> tuple[int, int, int] | None:
        local = self.local_moe(moe)
        if _EXPERT.search(name):  # EP: whole experts (the loader keeps this rank's)
            return None if self.expert_parallel else self._rows(local.intermediate_size, name)
        if local.shared_intermediate_size == moe.shared_intermediate_size:
            return None
        return self._rows(local.shared_intermediate_size, name)

    def _mla_slice(self, cfg: ModelConfig, name: str) -> tuple[int, int, int] | None:
        """q heads' rows of q_proj / q_b_proj and kv_b_proj, their columns of o_proj; the rest whole."""
        assert cfg.mla is not None
        (q0, nq), m = self.q_heads(cfg), cfg.mla
        per_head = {".q_proj.": (0, m.qk_head_dim), ".q_b_proj.": (0, m.qk_head_dim),
                    ".kv_b_proj.": (0, m.qk_nope_head_dim + m.v_head_dim), ".o_proj.": (1, m.v_head_dim)}
        for part, (dim, width) in per_head.items():
            if part in name:
                return dim, q0 * width, (q0 + nq) * width
        return None

    def weight_slice(self, cfg: ModelConfig, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the HF checkpoint tensor `name` this rank loads; None = all of it."""
        if self.size == 1:
            return None
        if cfg.moe is not None and (_EXPERT.search(name) or any(s in name for s in _SHARED)):
            return self._moe_slice(cfg.moe, name)
        i = cfg.intermediate_size // self.size
        if ".gate_proj." in name or ".up_proj." in name or ".down_proj." in name:
            return self._rows(i, name)
        if self.dp_attention:
            return None
        if cfg.mla is not None and ".self_attn." in name:
            return self._mla_slice(cfg, name)
        d = cfg.head_dim
        q0, nq = self.q_heads(cfg)
        k0, nk = self.kv_heads(cfg)
        if ".q_proj." in name:
            return 0, q0 * d, (q0 + nq) * d
        if ".k_proj." in name or ".v_proj." in name:
            return 0, k0 * d, (k0 + nk) * d
        if ".o_proj." in name:
            return 1, q0 * d, (q0 + nq) * d
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab_range(cfg))
        return None
