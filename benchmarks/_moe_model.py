"""A random-weight DeepSeek-V3-shaped model (MLA + MoE) for the issue-28 benchmarks, sized for a
2-core, 24 GiB machine, built once with HF transformers and cached in /tmp.

    python benchmarks/_moe_model.py [--size full|quick]     # prints the folder

Shapes (DeepSeek-V2-Lite's proportions at about half its width; V3's routing: sigmoid scores,
grouped top-k with the correction bias, one shared expert, a dense first layer):

    size   hidden layers heads  kv_lora rope nope v   experts top-k I_expert  params   fp32
    full   1024   8      16     256     32   64   64  32      4     384       ~390 M   ~1.6 GB
    quick  256    4      8      64      16   32   32  16      4     128       ~ 30 M   ~0.1 GB

The bundled model's tokenizer files are copied in (vocabulary 49152), so servers start on it as
on any HF folder. Weights are HF's init (std 0.02) with the correction bias spread a little, so
routing is not all ties.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "full": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, kv_lora_rank=256,
                 qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32,
                 num_experts_per_tok=4, moe_intermediate_size=384, intermediate_size=2816),
    "quick": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, kv_lora_rank=64,
                  qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=768),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def moe_model(size: str = "full", root: str = "/tmp") -> Path:
    """The folder of the `size` model (built on first use)."""
    out = Path(root) / f"pdserve-bench-mla-moe-{size}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    import transformers

    from pdserve.model.bundled import resolve_model

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False, q_lora_rank=None,
        num_key_value_heads=SIZES[size]["num_attention_heads"], n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **SIZES[size])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.01)
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok = resolve_model("default")
    for name in TOKENIZER_FILES:
        if (tok / name).exists():
            shutil.copy(tok / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    print(moe_model(ap.parse_args().size))
