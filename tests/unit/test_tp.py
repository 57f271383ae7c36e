"""Tensor parallelism: the slicing arithmetic, per-rank loading, and tp ranks (real processes,
gloo) equal to tp 1 and HF token for token on tiny Llama/Qwen models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.config import ModelConfig
from pdserve.model.loader import load_model
from pdserve.model.tp import TPShard, check_tp
from tests.hf_reference import hf_greedy
from tests.tiny_model import build_tiny_model

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)


def _cfg(heads: int, kv: int, inter: int = 128, vocab: int = 96) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=heads * 8, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=8)


def test_kv_heads_are_sharded_or_replicated_by_rank() -> None:
    cfg = _cfg(8, 2)  # the module docstring's example
    assert [TPShard(r, 4).kv_heads(cfg) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [TPShard(r, 4).q_heads(cfg) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [TPShard(r, 2).kv_heads(cfg) for r in range(2)] == [(0, 1), (1, 1)]
    # every q head reads the kv head HF's GQA gives it (q // (Hq / Hkv))
    for r in range(4):
        (q0, nq), (k0, _) = TPShard(r, 4).q_heads(cfg), TPShard(r, 4).kv_heads(cfg)
        assert {q // 4 for q in range(q0, q0 + nq)} == {k0}


def test_a_tp_size_that_does_not_fit_names_the_dimension_and_what_works(bundled_model_dir: Path) -> None:
    cfg = ModelConfig.from_folder(bundled_model_dir)  # 9 heads, 3 KV heads
    with pytest.raises(ValueError, match=r"num_attention_heads is 9.*tp sizes that work for this model: \[1, 3\]"):
        check_tp(cfg, 2)
    check_tp(cfg, 3)
    with pytest.raises(ValueError, match=r"intermediate_size is 90"):
        check_tp(_cfg(4, 2, inter=90), 4)
    with pytest.raises(ValueError, match=r"num_key_value_heads is 3"):
        check_tp(_cfg(6, 3), 2)
    with pytest.raises(ValueError, match=r"vocab_size is 97"):
        check_tp(_cfg(4, 2, vocab=97), 2)


def test_a_bad_tp_size_fails_before_any_weight_loads(bundled_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads is 9"):
        LLM(str(bundled_model_dir), tp_size=2, num_pages=8)


@pytest.fixture(scope="module")
def one_kv_head_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-1kv"), bundled_model_dir, kv_heads=1, tie=False, seed=3)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_loads_only_its_slices(tiny_model_dir: Path, tp: int) -> None:
    full = load_model(tiny_model_dir, torch.device("cpu"), torch.float32, 64, cpu_prepack=False)
    fp = dict(full.named_parameters())
    total = sum(p.numel() for p in fp.values())
    cfg = full.config
    for r in range(tp):
        part = load_model(tiny_model_dir, torch.device("cpu"), torch.float32, 64, TPShard(r, tp), cpu_prepack=False)
        mine = sum(p.numel() for p in part.parameters())
        assert mine < total / tp * 1.25  # replicated norms (and kv heads at tp 4) are small
        (q0, nq), (k0, nk), d = TPShard(r, tp).q_heads(cfg), TPShard(r, tp).kv_heads(cfg), cfg.head_dim
        qkv = part.model.layers[0].self_attn.qkv_proj.weight
        want = fp["model.layers.0.self_attn.qkv_proj.weight"]
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        assert torch.equal(qkv[: nq * d], want[q0 * d:(q0 + nq) * d])
        assert torch.equal(qkv[nq * d: (nq + nk) * d], want[q + k0 * d: q + (k0 + nk) * d])
        assert torch.equal(qkv[(nq + nk) * d:], want[q + kv + k0 * d: q + kv + (k0 + nk) * d])
        v0, v1 = TPShard(r, tp).vocab_range(cfg)
        assert torch.equal(part.model.embed_tokens.weight, fp["model.embed_tokens.weight"][v0:v1])


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(1, 50))] for _ in range(n)]


def _check(folder: Path, tp: int, prompts: list[list[int]]) -> None:
    with LLM(str(folder), num_pages=128, page_size=4, chunk_budget=48, threads=1, tp_size=tp) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.engine.check_integrity()
    for prompt, out in zip(prompts, outs):
        ids, lps = hf_greedy(folder, prompt, GREEDY.max_new_tokens)
        assert out.output_ids == ids
        assert out.logprobs is not None and max(abs(a - b) for a, b in zip(out.logprobs, lps)) < 1e-4


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_hf_on_tiny_llama(tiny_model_dir: Path, tp: int) -> None:
    _check(tiny_model_dir, tp, _prompts(10, seed=tp))  # tp 4 > 2 KV heads: replicated


def test_tp_with_a_single_kv_head_replicates_it(one_kv_head_dir: Path) -> None:
    _check(one_kv_head_dir, 2, _prompts(8, seed=5))  # and an untied LM head


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tp_on_qwen(tmp_path: Path, bundled_model_dir: Path, arch: str) -> None:
    folder = build_tiny_model(tmp_path / arch, bundled_model_dir, arch=arch)  # q/k/v bias; q/k norm
    _check(folder, 2, _prompts(6, seed=6))


@pytest.mark.parametrize("kwargs, match", [
    ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "10.0.0.1:1"}, "multiple of --nnodes"),
    ({"tp_size": 2, "nnodes": 2}, "needs --dist-init-addr"),
    ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "10.0.0.1:1"}, "--node-rank 2"),
])
def test_multinode_flags_that_cannot_work_are_refused(kwargs: dict, match: str) -> None:
    from pdserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs).check_parallel()
    assert EngineConfig(tp_size=2, nnodes=2, dist_init_addr="10.0.0.1:1").rendezvous() == ("10.0.0.1", 1)
