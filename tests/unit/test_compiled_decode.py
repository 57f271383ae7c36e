"""The compiled decode forward (engine/compiled.py) gives eager's tokens: batch sizes between
and at its bucket edges, page tables that grow while decoding, preemption; HF equality with
compile on and off; setups it does not cover run eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine import kernels
from pdserve.engine.messages import StepPlan
from tests.unit.test_engine_tiny import GREEDY, assert_matches_hf, random_prompts

pytestmark = pytest.mark.skipif(not kernels.load(), reason="no C++ compiler: no compiled decode")


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> tuple[LLM, LLM]:
    """The same tiny model with compile on and off (4-token pages: tables grow every 4 tokens)."""
    kw = dict(num_pages=256, page_size=4, chunk_budget=64, threads=1, max_running=16)
    return LLM(str(tiny_model_dir), **kw), LLM(str(tiny_model_dir), compile_decode=False, **kw)


def test_compiled_steps_equal_eager_logits(pair: tuple[LLM, LLM]) -> None:
    """Decode-only plans of 1, 2 (bucket edges), 3, 5, 11 rows (between) and 16 (the top):
    the compiled logits equal the eager ones, and the pool gets the same KV."""
    on, off = pair
    runner, eager = on.engine.runner, off.engine.runner
    assert runner.compiled is not None and eager.compiled is None
    for rows in (1, 2, 3, 5, 11, 16):
        spans, ids, pos = [], [], []
        for r in range(rows):
            n = 3 + 3 * r  # tokens already cached: tables of 1..13 pages
            pages = list(range(1 + 14 * r, 1 + 14 * r + n // 4 + 1))
            spans.append((pages, n, 1))
            ids.append(100 + r)
            pos.append(n)
        plan = StepPlan(ids, pos, spans, list(range(rows)), [])
        for pool in (runner.pool, eager.pool):
            torch.manual_seed(rows)
            pool.k.normal_()
            torch.manual_seed(rows + 100)
            pool.v.normal_()
        before = runner.compiled.steps
        a, _ = runner.run(plan)
        b, _ = eager.run(plan)
        assert runner.compiled.steps == before + 1
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(runner.pool.k, eager.pool.k)


def test_generation_equals_eager_across_growing_tables(pair: tuple[LLM, LLM]) -> None:
    """24 prompts of 1..60 tokens, 30 tokens each: batches shrink as requests finish and page
    tables grow by one page every 4 tokens; tokens equal, logprobs within 1e-4."""
    on, off = pair
    prompts = random_prompts(24, 1, 60, seed=7)
    params = [SamplingParams(max_new_tokens=10 + i, temperature=0.0, ignore_eos=True, logprobs=True)
              for i in range(24)]
    steps = on.engine.runner.compiled.steps
    a = on.generate(prompts, params, use_tqdm=False)
    b = off.generate(prompts, params, use_tqdm=False)
    assert on.engine.runner.compiled.steps > steps + 10
    for x, y in zip(a, b):
        assert x.output_ids == y.output_ids
        assert max(abs(u - v) for u, v in zip(x.logprobs or [], y.logprobs or [])) < 1e-4


def test_preemption_with_compile_equals_hf(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=40, page_size=4, chunk_budget=64, threads=1, decode_headroom=0.0)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, logprobs=True)
    assert_matches_hf(llm, tiny_model_dir, random_prompts(8, 20, 40, seed=4), params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.runner.compiled is not None and llm.engine.runner.compiled.steps > 0


def test_hf_equality_with_compile_off(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=256, page_size=4, chunk_budget=64, threads=1, compile_decode=False)
    assert llm.engine.runner.compiled is None
    assert_matches_hf(llm, tiny_model_dir, random_prompts(24, 1, 90), GREEDY)


def test_uncovered_setups_run_eager(tiny_model_dir: Path) -> None:
    """The gather attention path (no kernel in the graph) and bf16 are not compiled."""
    for kw in (dict(attention_backend="torch_native"), dict(dtype="bfloat16")):
        llm = LLM(str(tiny_model_dir), num_pages=32, page_size=4, threads=1, **kw)
        assert llm.engine.runner.compiled is None
