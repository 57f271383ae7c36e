"""The mixture-of-experts and latent-attention parts of a model's config, per HF architecture.

    arch                  scores   top-k choice                              weights
    Mixtral               softmax  top k                                     renormalised
    Qwen2-MoE, Qwen3-MoE  softmax  top k                                     renormalised if norm_topk_prob
    DeepSeek-V2           softmax  greedy, or group_limited_greedy: the      x routed_scaling_factor
                                   topk_group groups with the best expert    (renormalised if norm_topk_prob)
    DeepSeek-V3           sigmoid  noaux_tc: + e_score_correction_bias, the  the unbiased scores,
                                   topk_group groups with the best sum of    renormalised if norm_topk_prob,
                                   their top-2 biased scores, then top k     x routed_scaling_factor

Shared experts: Qwen2-MoE has one, gated by sigmoid(shared_expert_gate(x)); DeepSeek has
n_shared_experts folded into one MLP of n x moe_intermediate_size. Which layers are sparse:
Mixtral all; Qwen-MoE those not in mlp_only_layers with (i + 1) % decoder_sparse_step == 0;
DeepSeek i >= first_k_dense_replace with i % moe_layer_freq == 0. The others use a dense MLP of
intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORING = ("softmax", "sigmoid")
GROUP_SCORES = ("none", "max", "top2_sum")  # how a group of experts is ranked for grouped top-k


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    sparse_layers: tuple[int, ...]  # the layers whose MLP is a mixture; the others are dense
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int = 1  # grouped top-k: experts in num_groups groups, topk_groups of them eligible
    topk_groups: int = 1
    group_score: str = "none"
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias (choice only, not weights)
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: the shared expert's output x sigmoid(shared_expert_gate(x))

    def __post_init__(self) -> None:
        if self.scoring not in SCORING or self.group_score not in GROUP_SCORES:
            raise ValueError(f"unsupported routing: scoring {self.scoring!r}, group score {self.group_score!r}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} must be in [1, {self.num_experts}]")
        if self.num_experts % self.num_groups or not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"n_group {self.num_groups} must divide the {self.num_experts} experts and "
                             f"topk_group {self.topk_groups} be in [1, n_group]")


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: per token one latent c_kv (kv_lora_rank) and one
    shared rope key (qk_rope_head_dim) are cached; kv_b_proj expands c_kv to each head's
    k_nope (qk_nope_head_dim) and v (v_head_dim)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    rope_interleave: bool = True  # the checkpoint's rope dims are (x0, x1) pairs (DeepSeek's layout)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """One cached row: c_kv (normed) then k_pe (roped)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _experts(d: dict[str, Any]) -> int:
    return int(d.get("num_experts") or d.get("num_local_experts") or d.get("n_routed_experts") or 0)


def moe_from_dict(arch: str, d: dict[str, Any]) -> MoEConfig | None:
    """The MoE record of an HF config, None for a dense architecture."""
    layers = range(d["num_hidden_layers"])
    top_k = int(d.get("num_experts_per_tok") or 0)
    if arch == "MixtralForCausalLM":
        return MoEConfig(_experts(d), top_k, d["intermediate_size"], tuple(layers), norm_topk_prob=True)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        step, dense = int(d.get("decoder_sparse_step", 1)), set(d.get("mlp_only_layers") or ())
        sparse = tuple(i for i in layers if i not in dense and _experts(d) > 0 and (i + 1) % step == 0)
        shared = int(d.get("shared_expert_intermediate_size") or 0)
        return MoEConfig(_experts(d), top_k, d["moe_intermediate_size"], sparse,
                         norm_topk_prob=bool(d.get("norm_topk_prob", False)), shared_intermediate_size=shared,
                         shared_gate=shared > 0)
    if arch in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        first, freq = int(d.get("first_k_dense_replace") or 0), int(d.get("moe_layer_freq") or 1)
        sparse = tuple(i for i in layers if i >= first and i % freq == 0)
        v3 = arch == "DeepseekV3ForCausalLM"
        method = "noaux_tc" if v3 else d.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported topk_method {method!r} for {arch}")
        grouped = method != "greedy"
        inter = int(d["moe_intermediate_size"])
        return MoEConfig(_experts(d), top_k, inter, sparse,
                         scoring="sigmoid" if v3 else "softmax",
                         norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
                         routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
                         num_groups=int(d.get("n_group") or 1) if grouped else 1,
                         topk_groups=int(d.get("topk_group") or 1) if grouped else 1,
                         group_score={"greedy": "none", "group_limited_greedy": "max"}.get(method, "top2_sum"),
                         correction_bias=v3, shared_intermediate_size=inter * int(d.get("n_shared_experts") or 0))
    return None


def mla_from_dict(arch: str, d: dict[str, Any]) -> MLAConfig | None:
    if arch not in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        return None
    if d.get("quantization_config"):
        raise ValueError(f"{arch}: quantized checkpoints ({d['quantization_config'].get('quant_method', '?')}) "
                         "are not supported; convert the weights to bf16/fp32 first")
    return MLAConfig(kv_lora_rank=int(d["kv_lora_rank"]), qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                     qk_rope_head_dim=int(d["qk_rope_head_dim"]), v_head_dim=int(d["v_head_dim"]),
                     q_lora_rank=d.get("q_lora_rank"), rope_interleave=bool(d.get("rope_interleave", True)))
