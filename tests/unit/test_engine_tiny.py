"""Engine on tiny random models vs HF transformers: token-for-token greedy, logprobs, chunked
prefill, prefix hits, preemption, several architectures, validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.messages import GenerateReq
from pdserve.engine.sampling_params import SamplingError
from tests.hf_reference import hf_greedy
from tests.tiny_model import build_tiny_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_matches_hf(llm: LLM, folder: Path, prompts: list[list[int]], params: SamplingParams = GREEDY) -> None:
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids, lps = hf_greedy(folder, prompt, params.max_new_tokens)
        assert out.output_ids == ids
        assert out.logprobs is not None
        assert max(abs(a - b) for a, b in zip(out.logprobs, lps)) < 1e-4
    llm.engine.check_integrity()


def test_greedy_equals_hf_on_mixed_batch(tiny_llm: LLM, tiny_model_dir: Path) -> None:
    assert_matches_hf(tiny_llm, tiny_model_dir, random_prompts(24, 1, 90))


def test_tiny_chunk_budget_forces_chunked_prefill(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=256, page_size=4, chunk_budget=7, threads=1)
    assert_matches_hf(llm, tiny_model_dir, random_prompts(20, 10, 60, seed=1))


def test_prefix_cache_hits_keep_output_exact(tiny_llm: LLM, tiny_model_dir: Path) -> None:
    system = random_prompts(1, 40, 40, seed=2)[0]
    prompts = [system + tail for tail in random_prompts(20, 1, 20, seed=3)]
    first = tiny_llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.cached_tokens == 0 or first.cached_tokens % 4 == 0
    outs = tiny_llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert all(o.cached_tokens >= 40 for o in outs)  # 40-token system prompt = 10 full pages
    assert_matches_hf(tiny_llm, tiny_model_dir, prompts)


def test_preemption_under_a_small_pool_keeps_output_exact(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=40, page_size=4, chunk_budget=64, threads=1, decode_headroom=0.0)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, logprobs=True)
    assert_matches_hf(llm, tiny_model_dir, random_prompts(8, 20, 40, seed=4), params)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_other_architectures(arch: str, tmp_path: Path, bundled_model_dir: Path) -> None:
    folder = build_tiny_model(tmp_path / arch, bundled_model_dir, arch=arch, tie=(arch != "qwen2"))
    llm = LLM(str(folder), num_pages=128, page_size=8, chunk_budget=32, threads=1)
    assert_matches_hf(llm, folder, random_prompts(6, 5, 80, seed=5))


def test_seeded_sampling_is_reproducible(tiny_llm: LLM) -> None:
    prompts = random_prompts(4, 5, 20, seed=6)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    a = tiny_llm.generate(prompts, p, use_tqdm=False)
    b = tiny_llm.generate(prompts[::-1], p, use_tqdm=False)[::-1]  # other batch order
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    c = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=99, ignore_eos=True), use_tqdm=False)
    assert [o.output_ids for o in a] != [o.output_ids for o in c]


def test_stop_token_and_max_tokens(tiny_llm: LLM) -> None:
    prompt = random_prompts(1, 10, 10, seed=7)[0]
    free = tiny_llm.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(free.output_ids) == 10 and free.finish_reason == "length"
    stop_id = free.output_ids[4]
    first = free.output_ids.index(stop_id)
    out = tiny_llm.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True,
                                                     stop_token_ids=(stop_id,)), use_tqdm=False)[0]
    assert out.output_ids == free.output_ids[: first + 1]
    assert out.finish_reason == "stop" and out.matched_stop == stop_id
    zero = tiny_llm.generate([prompt], SamplingParams(max_new_tokens=0), use_tqdm=False)[0]
    assert zero.output_ids == [] and zero.finish_reason == "length"
    tiny_llm.engine.check_integrity()


def test_stop_string_truncates_text(tiny_llm: LLM) -> None:
    prompt = random_prompts(1, 10, 10, seed=8)[0]
    free = tiny_llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("degenerate whitespace output")
    out = tiny_llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop
    assert out.text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("ids", "params", "match"),
    [
        ([], SamplingParams(), "empty"),
        ([5] * 2000, SamplingParams(), "context"),
        ([5, 6], SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        ([5, 6], SamplingParams(top_p=1.5), "top_p"),
        ([5, 6], SamplingParams(temperature=-0.5), "temperature"),
        ([5, 10**6], SamplingParams(), "vocabulary"),
    ],
)
def test_bad_input_raises_clear_error(tiny_llm: LLM, ids: list[int], params: SamplingParams, match: str) -> None:
    with pytest.raises(SamplingError, match=match):
        tiny_llm.engine.add_request(GenerateReq("bad", ids, params))
    assert not tiny_llm.engine.has_work()
    tiny_llm.engine.check_integrity()


def test_unknown_model_path_raises() -> None:
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        LLM("/no/such/model")


def test_abort_returns_pages(tiny_llm: LLM) -> None:
    eng = tiny_llm.engine
    for i, p in enumerate(random_prompts(6, 30, 60, seed=9)):
        eng.add_request(GenerateReq(f"ab{i}", p, SamplingParams(max_new_tokens=50, ignore_eos=True)))
    eng.step()
    eng.step()
    for i in range(6):
        eng.abort(f"ab{i}")
    outs = eng.step()
    assert sorted(o.rid for o in outs if o.finish_reason == "abort") == [f"ab{i}" for i in range(6)]
    assert not eng.has_work()
    eng.check_integrity()
    assert eng.load().num_running == 0


def test_threads_are_set() -> None:
    assert torch.get_num_threads() >= 1


def test_llm_chat_renders_the_template_and_takes_vllm_names(tiny_llm: LLM) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    (out,) = tiny_llm.chat(msgs, params, use_tqdm=False)
    ids = tiny_llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert out.prompt_ids == ids and len(out.output_ids) == 5
    assert out.output_ids == tiny_llm.generate([ids], params, use_tqdm=False)[0].output_ids
    both = tiny_llm.chat([msgs, [{"role": "user", "content": "Bye"}]], params, use_tqdm=False)
    assert [o.prompt_ids == ids for o in both] == [True, False]


def test_prompt_logprobs_equal_hf_despite_prefix_cache_and_chunks(tiny_model_dir: Path) -> None:
    from tests.hf_reference import hf_model

    llm = LLM(str(tiny_model_dir), num_pages=128, page_size=4, chunk_budget=7, threads=1)
    prompt = random_prompts(1, 30, 30, seed=9)[0]
    llm.generate([prompt], GREEDY, use_tqdm=False)  # its pages are cached now: scoring must recompute them
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(tiny_model_dir)(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for start, max_new in ((0, 0), (5, 2)):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True, top_logprobs=2)
        llm.engine.add_request(GenerateReq(f"score-{start}", prompt, params, return_prompt_logprobs=True,
                                           prompt_logprobs_from=start))
        outs = []
        while not outs or not outs[-1].finished:
            outs += [o for o in llm.engine.step() if o.rid == f"score-{start}"]
        got = [o for o in outs if o.prompt_logprobs is not None]
        assert len(got) == 1 and sum(len(o.token_ids) for o in outs) == max_new
        lps, tops = got[0].prompt_logprobs, got[0].prompt_top_logprobs
        assert len(lps) == len(prompt) - start and (lps[0] is None) == (start == 0)
        want = [float(ref[i - 1, prompt[i]]) for i in range(max(start, 1), len(prompt))]
        assert max(abs(a - b) for a, b in zip(lps[1 if start == 0 else 0:], want)) < 1e-4
        assert tops is not None and [t.token_id for t in tops[-1]] == ref[len(prompt) - 2].topk(2).indices.tolist()
    llm.engine.check_integrity()
