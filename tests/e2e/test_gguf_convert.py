"""GGUF -> HF folder conversion: logits match transformers' own GGUF loader; caching works."""

from __future__ import annotations

import json
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.cli.convert import run_convert
from pdserve.model.bundled import bundled_gguf_path, cache_dir, resolve_model
from pdserve.model.gguf_convert import COMPLETE_MARKER, convert_gguf, reverse_permute

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (the forward direction)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_reverse_permute_undoes_llama_cpp() -> None:
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = rng.standard_normal((n_head * head_dim, 16)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(reverse_permute(permuted, n_head), w)


def test_config_and_files(bundled_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", COMPLETE_MARKER):
        assert (bundled_model_dir / name).is_file(), name
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    layers_hidden_ffn = (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"])
    assert layers_hidden_ffn == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    assert config["eos_token_id"] == 2 and config["bos_token_id"] == 1
    assert json.loads((bundled_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((bundled_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]

    from safetensors import safe_open

    with safe_open(str(bundled_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.float32
    assert "lm_head.weight" not in names  # tied to the embeddings
    assert len(names) == 2 + 30 * 9
    assert "model.layers.29.mlp.down_proj.weight" in names


def test_logits_match_transformers_gguf_loader(bundled_model_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = bundled_gguf_path()
    ours = LlamaForCausalLM.from_pretrained(str(bundled_model_dir), dtype=torch.float32).eval()
    theirs = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir))
    assert ours.config.tie_word_embeddings
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            a = ours(ids).logits
            b = theirs(ids).logits
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert a[0, -1].argmax() == b[0, -1].argmax()


def test_resolve_model_converts_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    gguf = tmp_path / "src" / "My-Model.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(bundled_gguf_path(), gguf)  # a copy: symlinks resolve to the bundled file

    first = resolve_model(str(gguf), progress=False)
    assert first.parent == tmp_path / "cache" / "models"
    assert first.name.startswith("My-Model-")
    assert (first / COMPLETE_MARKER).is_file()
    leftovers = [p.name for p in first.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == []

    started = time.perf_counter()
    second = resolve_model(str(gguf))
    assert time.perf_counter() - started < 1.0
    assert second == first


def test_resolve_model_paths(bundled_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(bundled_model_dir)) == bundled_model_dir.resolve()
    assert resolve_model("default") == bundled_model_dir
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="unknown model path") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="unknown model path"):
        resolve_model(str(not_gguf))


def test_convert_refuses_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_gguf(bundled_gguf_path(), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_convert(bundled_model_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_convert(Namespace(model="default", out=None, no_progress=True)) == 0
    assert capsys.readouterr().out.strip() == str(bundled_model_dir)
    assert run_convert(Namespace(model=str(tmp_path / "nope"), out=None, no_progress=True)) == 2
    assert "unknown model path" in capsys.readouterr().err
