"""Convert a llama.cpp GGUF file into a Hugging Face Llama folder (float32).

The output folder holds ``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` with HF
tensor names, ``generation_config.json`` and the tokenizer files (``tokenizer.json``,
``tokenizer_config.json`` with the chat template from the GGUF metadata).

Every tensor is dequantised to float32 with ``gguf.quants.dequantize``. llama.cpp's converter
permutes the rows of ``q_proj``/``k_proj`` (it interleaves the two rotary halves of each head);
that permutation is undone exactly as transformers' GGUF loader does, so the folder matches
``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` bit for bit.

The folder is written to a temporary sibling directory and renamed into place, with a marker
file (:data:`COMPLETE_MARKER`) written last, so a crash never leaves a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Written last into a finished folder; its presence means the conversion completed.
COMPLETE_MARKER = ".pdserve-complete"
#: Bump when the output format changes: cached folders of older versions are rebuilt.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_TENSORS: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Optional biases (Llama models with attention_bias=True).
_LAYER_BIASES: dict[str, str] = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp stores that a plain HF Llama has no place for (recomputed at runtime).
_IGNORED_TENSORS = ("rope_freqs.weight",)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection (rows = n_head * head_dim).

    llama.cpp stores each head's rows as ``reshape(n_head, 2, dim/2).swapaxes(1, 2)`` of HF's;
    this is transformers' ``LlamaTensorProcessor._reverse_permute_weights``. ``n_head`` is the
    number of query heads for q_proj and of KV heads for k_proj.
    """
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """The decoded value of a GGUF metadata field, or ``default`` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_metadata(reader: Any) -> dict[str, Any]:
    """Build the HF ``config.json`` dict for the Llama model described by a ``GGUFReader``."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF file lacks required metadata key {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    q_rows = next((int(t.shape[-1]) for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or (q_rows or hidden) // n_heads)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        logger.warning("GGUF rope.dimension_count %s != head_dim %s (partial rotary is not supported)",
                       rope_dim, head_dim)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError("GGUF file has neither a vocab_size nor tokenizer tokens")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensor_names),
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    if pad is not None:
        config["pad_token_id"] = int(pad)
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if "rope_freqs.weight" in tensor_names and rope_scaling is None:
        logger.warning("GGUF has rope_freqs (llama3-style rope scaling) without rope.scaling.* "
                       "metadata; it is ignored, long-context positions may differ")
    return config


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` metadata, or None when absent/none."""
    rope_type = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if rope_type in (None, "none") or factor is None:
        return None
    scaling: dict[str, Any] = {"rope_type": str(rope_type), "factor": float(factor)}
    orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def eos_token_ids(reader: Any) -> list[int]:
    """End-of-generation ids from GGUF metadata: eos, then end-of-turn / end-of-message."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name; None for tensors that have no HF counterpart."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    if match and match.group(2) in _LAYER_BIASES:
        return f"model.layers.{match.group(1)}.{_LAYER_BIASES[match.group(2)]}"
    if gguf_name in _IGNORED_TENSORS:
        return None
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")


def dequantize_tensors(reader: Any, config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Dequantise every GGUF tensor to a float32 torch tensor keyed by its HF name."""
    import torch
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantising GGUF tensors", unit="tensor", disable=not progress):
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists ne0 first
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weights = reverse_permute(weights, n_heads)
        elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weights = reverse_permute(weights, n_kv)
        out[name] = torch.from_numpy(np.require(weights, requirements=["C", "W"]))
    _check_complete(out, config)
    return out


def _check_complete(tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise ValueError when a tensor that a Llama model needs is missing."""
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{i}.{hf}" for hf in _LAYER_TENSORS.values()]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[:3]}")


def write_tokenizer(gguf_path: Path, out_dir: Path, chat_template: str | None) -> None:
    """Save transformers' tokenizer for the GGUF into ``out_dir`` with the chat template.

    The template lands both in ``chat_template.jinja`` (transformers 5's own layout) and in
    ``tokenizer_config.json`` (read by older loaders and by other tools).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    template = getattr(tokenizer, "chat_template", None) or chat_template
    if template:
        tok_config["chat_template"] = template
    # A class name every transformers version (4.x and 5.x) resolves to a fast tokenizer.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_replaceable(path: Path) -> bool:
    """True when ``path`` may be replaced: absent, an empty folder, or a folder we wrote."""
    if not path.exists():
        return True
    return path.is_dir() and ((path / COMPLETE_MARKER).is_file() or not any(path.iterdir()))


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 progress: bool = True) -> Path:
    """Convert ``gguf_path`` into an HF Llama folder at ``out_dir`` and return its path.

    ``out_dir`` must be absent, empty, or a folder an earlier conversion wrote (it is then
    replaced); anything else raises ``FileExistsError`` rather than deleting user files.
    """
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if not _is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a pdserve-converted model folder; "
                              "choose an empty or new output folder")

    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        reader = GGUFReader(str(gguf_path))
        config = read_metadata(reader)
        tensors = dequantize_tensors(reader, config, progress=progress)
        save_file(tensors, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp_dir / "config.json", config)
        generation: dict[str, Any] = {"_from_model_config": False}
        eos = eos_token_ids(reader)
        if eos:
            generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        for key in ("bos_token_id", "pad_token_id"):
            if key in config:
                generation[key] = config[key]
        _write_json(tmp_dir / "generation_config.json", generation)
        write_tokenizer(gguf_path, tmp_dir, _field(reader, "tokenizer.chat_template"))
        del reader
        stat = gguf_path.stat()
        _write_json(tmp_dir / COMPLETE_MARKER, {
            "source": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "converter_version": CONVERTER_VERSION,
        })
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Converted %s -> %s in %.1f s", gguf_path, out_dir, time.perf_counter() - started)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``out_dir``, replacing an old converted/empty ``out_dir``."""
    if out_dir.exists():
        if not _is_replaceable(out_dir):
            raise FileExistsError(f"{out_dir} appeared during conversion and is not ours")
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        try:
            os.rename(tmp_dir, out_dir)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_dir, out_dir)
