"""Tiny random Llama-family models for fast unit tests, built with HF transformers.

The tokenizer files come from the bundled model (so stop strings and chat templates are
real); the weights are random and small enough that a forward takes milliseconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def build_tiny_model(out: Path, tokenizer_dir: Path, *, arch: str = "llama", seed: int = 0,
                     tie: bool = True, vocab_size: int = 49152, layers: int = 2, kv_heads: int = 2, heads: int = 4,
                     hidden: int = 64, intermediate: int = 128, attn_out_scale: float = 1.0) -> Path:
    """`attn_out_scale` < 1 shrinks o_proj: the next token then depends mostly on the last one, so
    greedy output soon repeats itself (speculative decoding's tests want drafts that get accepted),
    while attention, and so every KV row, still moves the logits."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "llama3":
        cfg = transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen so outputs are not all ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2 * (attn_out_scale if "o_proj" in name else 1.0))
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
