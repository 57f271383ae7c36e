"""Model configuration, read from a Hugging Face `config.json`.

Dense (model/llama.py): Llama 2/3 (incl. llama3 RoPE scaling), SmolLM2, Mistral, Qwen2 (q/k/v
bias) and Qwen3 (per-head q/k RMSNorm). Mixture of experts and latent attention
(model/moe_lm.py): Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3; their extra fields are the
nested `moe` (model/moe_config.py) and `mla` records. Accepts both the classic
`rope_theta`/`rope_scaling` keys and the newer `rope_parameters` dict (YaRN: model/rope.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.model.moe_config import MLAConfig, MoEConfig, mla_from_dict, moe_from_dict

DENSE_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
SPARSE_ARCHS = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
                "DeepseekV3ForCausalLM"}
SUPPORTED_ARCHS = DENSE_ARCHS | SPARSE_ARCHS


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    architecture: str = "LlamaForCausalLM"
    eos_token_id: tuple[int, ...] = ()
    moe: MoEConfig | None = None  # mixture-of-experts MLP (in moe.sparse_layers)
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek): the KV cache holds latents

    @property
    def num_params(self) -> int:
        """Parameter count of a dense model (embeddings counted once when tied)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    @property
    def attention_kind(self) -> str:
        """mla (one latent per token), else by KV heads per query head: mha, gqa or mqa."""
        if self.mla is not None:
            return "mla"
        kv = self.num_key_value_heads
        return "mha" if kv == self.num_attention_heads else "mqa" if kv == 1 else "gqa"

    @property
    def rotary_dim(self) -> int:
        """The dims RoPE rotates: the whole head, or MLA's rope part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        """Cache elements one token holds over all layers: K and V per KV head, or one MLA latent."""
        if self.mla is not None:
            return self.num_hidden_layers * self.mla.latent_dim
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of one token's cache (other dtypes: kv_elements_per_token x itemsize)."""
        return self.kv_elements_per_token * 4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; pdserve serves {sorted(SUPPORTED_ARCHS)}")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        mla = mla_from_dict(arch, d)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=mla.qk_head_dim if mla else d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=_with_original_length(scaling, d),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", d.get("qkv_bias", arch in _QKV_BIAS))),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            architecture=arch,
            eos_token_id=eos_ids,
            moe=moe_from_dict(arch, d),
            mla=mla,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        return cls.from_dict(json.loads(path.read_text()))


def check_architecture(model: Path) -> None:
    """Start-up check of an HF folder (no weights read): its config.json parses and names an
    architecture pdserve serves; raises ValueError with one line. A .gguf file is left to the
    engine (its conversion reads the architecture from the GGUF metadata)."""
    if model.is_dir():
        try:
            ModelConfig.from_folder(model)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"model {model}: config.json is not a usable model config ({type(exc).__name__}: "
                             f"{exc})") from None
        except ValueError as exc:
            raise ValueError(f"model {model}: {exc}") from None


_QKV_BIAS = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")


def _with_original_length(scaling: dict[str, Any] | None, d: dict[str, Any]) -> dict[str, Any] | None:
    """YaRN needs the pre-training length: a top-level `original_max_position_embeddings` wins
    (as HF reads it), then the scaling dict's own, then max_position_embeddings."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return scaling
    top = d.get("original_max_position_embeddings")
    length = top or scaling.get("original_max_position_embeddings") or d.get("max_position_embeddings", 2048)
    return {**scaling, "original_max_position_embeddings": length}


# generation_config.json keys that are sampling defaults, as vLLM reads them (name there -> ours)
_SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}


def sampling_defaults(folder: str | Path) -> dict[str, Any]:
    """The model's sampling defaults from `folder/generation_config.json` (absent keys, or no
    file: none). A request's own values win; `--generation-config none` skips this."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read it: {exc}") from None
    out: dict[str, Any] = {}
    for key, kind in _SAMPLING_KEYS.items():
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = kind(value)
    return out
