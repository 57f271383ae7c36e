"""The bundled SmolLM2-135M through the engine equals HF transformers token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from tests.hf_reference import hf_greedy

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "List three colours:", "The quick brown fox", "Water boils at", "In 1492, Columbus",
    "The meaning of life is", "import numpy as np\n", "My favourite food is",
    "Photosynthesis is the process by which plants", "Hello! How are you today?",
    "The largest planet in the solar system is", "To make a cup of tea, first",
    "SELECT * FROM users WHERE", "A haiku about autumn:\n", "The theory of relativity states that",
    "Translate to French: good morning ->", "1, 1, 2, 3, 5, 8,", "Dear hiring manager,",
    "The stock market today", "Rain in Spain falls mainly on the",
]


@pytest.fixture(scope="module")
def llm(bundled_model_dir: Path) -> LLM:
    return LLM(str(bundled_model_dir), kv_cache_gb=0.25, chunk_budget=256)


def test_bundled_greedy_equals_hf_on_22_prompts(llm: LLM, bundled_model_dir: Path) -> None:
    tok = llm.tokenizer
    # mixed lengths: some prompts repeated to a few hundred tokens
    prompts = [tok.encode(p * (1 + 12 * (i % 3 == 0))) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        ids, lps = hf_greedy(bundled_model_dir, p, 16)
        assert out.output_ids == ids
        assert max(abs(a - b) for a, b in zip(out.logprobs or [], lps)) < 1e-4
    llm.engine.check_integrity()


def test_bundled_chunked_prefill_and_prefix_hits(bundled_model_dir: Path) -> None:
    llm = LLM(str(bundled_model_dir), kv_cache_gb=0.25, chunk_budget=24, page_size=8)
    tok = llm.tokenizer
    system = tok.apply_chat_template([{"role": "system", "content": "You are a terse assistant. " * 6},
                                      {"role": "user", "content": "x"}])[:-8]
    prompts = [system + tok.encode(q) for q in ("Name a fruit.", "Name a river.", "Name a king.")]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)
    outs = llm.generate(prompts[1:], params, use_tqdm=False)
    assert all(o.cached_tokens >= 8 * (len(system) // 8) - 8 for o in outs)
    for p, out in zip(prompts[1:], outs):
        assert out.output_ids == hf_greedy(bundled_model_dir, p, 10)[0]
    llm.engine.check_integrity()


def test_chat_generation_is_sensible(llm: LLM) -> None:
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = llm.generate([ids], SamplingParams(max_new_tokens=24, temperature=0.0), use_tqdm=False)[0]
    assert "Paris" in out.text
