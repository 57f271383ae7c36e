"""Tiny random mixture-of-experts / MLA models for tests, built with HF transformers 5.24.

Shapes follow each family's real layout at toy sizes: Mixtral (block_sparse_moe, w1/w2/w3),
Qwen2-MoE (shared expert with its sigmoid gate, a dense layer via mlp_only_layers), Qwen3-MoE
(q/k norm; norm_topk_prob on or off), DeepSeek-V3 (q_lora, MLA, grouped noaux_tc routing with a
correction bias, routed_scaling_factor, a dense first layer, YaRN with mscale_all_dim) and
DeepSeek-V2-Lite (no q_lora, greedy softmax routing, two shared experts).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.tiny_model import TOKENIZER_FILES

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_renorm", "deepseek_v3", "deepseek_v2_lite")


def tiny_moe_config(arch: str, vocab_size: int = 49152):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=96, num_local_experts=8,
                                          num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=96,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                           num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])
    if arch.startswith("qwen3_moe"):
        return transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                           norm_topk_prob=arch.endswith("renorm"))
    mla = dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, kv_lora_rank=32,
               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1)
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common, **mla, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.8,
                             "beta_fast": 32, "beta_slow": 1})
    if arch == "deepseek_v2_lite":
        return transformers.DeepseekV2Config(**common, **mla, q_lora_rank=None, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=2, topk_method="greedy",
                                             routed_scaling_factor=1.0, norm_topk_prob=False)
    raise ValueError(arch)


def build_tiny_moe(out: Path, tokenizer_dir: Path, arch: str, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(arch))
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen so outputs and routing are not all ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)  # HF starts it at zero: make it choose
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
