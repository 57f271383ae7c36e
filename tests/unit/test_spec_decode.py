"""Speculative decoding on tiny random models: every proposer's greedy output equals plain decoding
token for token (logprobs too), with chunked prefill, prefix hits, preemption, stop strings,
penalties, prompt copies and json_schema; seeded sampling with a draft-free proposer equals plain
decoding; a draft model's rejection sampling keeps the target's distribution; refused drafts
never reach the radix cache; pools stay whole. The models repeat themselves (o_proj scaled down,
tests/tiny_model.py), so drafts are accepted, partly accepted and refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq
from pdserve.engine.sampling_params import GrammarSpec
from pdserve.engine.spec.config import SpecConfig
from tests.tiny_model import build_tiny_model

VOCAB = 64
GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
BASE = dict(num_pages=256, page_size=4, chunk_budget=24, threads=1)


@pytest.fixture(scope="module")
def loop_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("loop"), bundled_model_dir, vocab_size=VOCAB, seed=1,
                            attn_out_scale=0.02)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    """The target's weights with a stronger attention: it mostly agrees with the target."""
    return build_tiny_model(tmp_path_factory.mktemp("draft"), bundled_model_dir, vocab_size=VOCAB, seed=1,
                            attn_out_scale=0.1)


@pytest.fixture(scope="module")
def plain(loop_dir: Path) -> LLM:
    return LLM(str(loop_dir), **BASE)


def spec_llm(folder: Path, algorithm: str, draft: Path | None = None, adaptive: bool = False, **kw) -> LLM:
    spec = SpecConfig(algorithm=algorithm, draft_model_path=str(draft) if draft else None, adaptive=adaptive)
    return LLM(str(folder), **{**BASE, **kw}, speculative=spec)


def prompts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_same(ref: list, got: list) -> None:
    for a, b in zip(ref, got, strict=True):
        assert b.output_ids == a.output_ids
        assert (b.finish_reason, b.matched_stop) == (a.finish_reason, a.matched_stop)
        if a.logprobs is not None:
            assert b.logprobs is not None and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        if a.top_logprobs is not None:
            assert [[t.token_id for t in row] for row in a.top_logprobs] == \
                   [[t.token_id for t in row] for row in b.top_logprobs]


def cached_sequences(engine: Engine) -> list[list[int]]:
    """Every root-to-leaf token path of the radix cache."""
    out, stack = [], [(engine.kv.cache.root, [])]
    while stack:
        node, path = stack.pop()
        if not node.children:
            out.append(path)
        stack.extend((c, path + list(c.key)) for c in node.children.values())
    return out


@pytest.mark.parametrize("algorithm", ["NGRAM", "SUFFIX", "STANDALONE"])
def test_greedy_equals_plain_and_refused_drafts_stay_out_of_the_cache(algorithm: str, loop_dir: Path, draft_dir: Path,
                                                                      plain: LLM) -> None:
    llm = spec_llm(loop_dir, algorithm, draft_dir if algorithm == "STANDALONE" else None)
    finals: list[list[int]] = []
    for seed in (0, 1):  # SUFFIX: the second round also looks up the first round's outputs
        ps = prompts(12, seed)
        ref = plain.generate(ps, GREEDY, use_tqdm=False)
        got = llm.generate(ps, GREEDY, use_tqdm=False)
        assert_same(ref, got)
        finals += [p + o.output_ids for p, o in zip(ps, got)]
        for path in cached_sequences(llm.engine):  # only pages of real tokens: no refused draft
            assert any(f[: len(path)] == path for f in finals), "a cached page holds a token no request produced"
    s = llm.engine.speculator.stats
    assert 0 < s.accepted_tokens < s.draft_tokens  # drafts accepted and refused
    assert s.accept_lengths[0] > 0 and sum(s.accept_lengths[2:]) > 0  # whole refusals and long runs
    llm.engine.check_integrity()
    assert llm.engine.kv.allocator.num_free + llm.engine.kv.cache.num_pages == llm.engine.kv.capacity


def test_prefix_hits_preemption_stops_and_penalties(loop_dir: Path, plain: LLM) -> None:
    system = prompts(1, 5, 24, 24)[0]
    ps = [system + p for p in prompts(8, 6, 1, 12)]
    free = plain.generate(ps, GREEDY, use_tqdm=False)
    tok = plain.tokenizer
    stops = [tok.decode(o.output_ids[12:14]) for o in free]
    cases = [
        SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=(s,), logprobs=True)
        for s in stops[:1]
    ] + [
        SamplingParams(max_new_tokens=33, min_new_tokens=7, temperature=0.0, stop_token_ids=(21, 52), logprobs=True),
        SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.3),
    ]
    llm = spec_llm(loop_dir, "NGRAM", num_pages=60, decode_headroom=0.0)  # small pool: preemption
    for params in cases:
        ref = plain.generate(ps, params, use_tqdm=False)
        assert_same(ref, llm.generate(ps, params, use_tqdm=False))
    per_prompt = [SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=(s,)) for s in stops]
    assert_same(plain.generate(ps, per_prompt, use_tqdm=False), llm.generate(ps, per_prompt, use_tqdm=False))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.speculator.stats.accepted_tokens > 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("algorithm", ["NGRAM", "SUFFIX"])
def test_seeded_sampling_equals_plain_with_draft_free_proposers(algorithm: str, loop_dir: Path, plain: LLM) -> None:
    """Row j draws the generator's j-th number, and a rollback rewinds it: the same tokens."""
    ps = prompts(10, 7)
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=8, seed=s, ignore_eos=True,
                             frequency_penalty=0.3, logprobs=True) for s in range(len(ps))]
    llm = spec_llm(loop_dir, algorithm)
    assert_same(plain.generate(ps, params, use_tqdm=False), llm.generate(ps, params, use_tqdm=False))
    assert llm.engine.speculator.stats.accepted_tokens > 0


def test_prompt_copies_share_pages_and_outputs_count_accepted_drafts(loop_dir: Path, plain: LLM) -> None:
    """n > 1: copies of a prompt wait for the first and share its pages (server/params.py); each
    request's last TokenOut counts its verify forwards and accepted drafts (usage reports them)."""
    prompt = prompts(1, 8, 30, 30)[0]
    outs, accepted = {}, 0
    spec = spec_llm(loop_dir, "SUFFIX")
    for name, llm in (("plain", plain), ("spec", spec)):
        e = llm.engine
        for j in range(4):
            params = SamplingParams(max_new_tokens=24, temperature=0.7 if j else 0.0, seed=j, ignore_eos=True)
            e.add_request(GenerateReq(f"{name}{j}", prompt, params, share_prompt_with=f"{name}0" if j else None))
        got: dict[str, list[int]] = {}
        while e.has_work():
            for o in e.step():
                got.setdefault(o.rid[len(name):], []).extend(o.token_ids)
                if o.finished and name == "spec":
                    accepted += o.spec_accepted_tokens
                    assert o.spec_verify_ct > 0
        e.check_integrity()
        outs[name] = got
    assert outs["spec"] == outs["plain"]
    assert accepted == spec.engine.speculator.stats.accepted_tokens > 0


def test_json_schema_with_speculation(tiny_model_dir: Path, bundled_model_dir: Path, tmp_path: Path) -> None:
    """The grammar cuts proposals it refuses and masks each verified row after the drafts before it."""
    folder = build_tiny_model(tmp_path / "m", bundled_model_dir, attn_out_scale=0.02)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "tags": {
        "type": "array", "items": {"type": "string", "enum": ["aa", "bb"]}, "maxItems": 6}},
        "required": ["name", "tags"]}
    params = SamplingParams(max_new_tokens=60, temperature=0.0, logprobs=True,
                            grammar=GrammarSpec("json_schema", json.dumps(schema)))
    rng = random.Random(0)
    ps = [[rng.randrange(3, 49000) for _ in range(rng.randint(3, 20))] for _ in range(5)]
    cfg = dict(num_pages=256, page_size=4, chunk_budget=64, threads=1)
    ref = LLM(str(folder), **cfg).generate(ps, params, use_tqdm=False)
    for algorithm, draft in (("NGRAM", None), ("STANDALONE", str(folder))):
        spec = SpecConfig(algorithm=algorithm, draft_model_path=draft, adaptive=False)
        llm = LLM(str(folder), **cfg, speculative=spec)
        got = llm.generate(ps, params, use_tqdm=False)
        assert_same(ref, got)
        assert all(isinstance(json.loads(o.text), dict) for o in got)
        llm.engine.check_integrity()
    assert llm.engine.speculator.stats.accepted_tokens > 0


def _pairs(llm: LLM, prompt: list[int], n: int, top_k: int) -> dict[tuple[int, int], int]:
    """Counts of the (2nd, 3rd) output tokens over n seeded requests."""
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, top_k=top_k, seed=s, ignore_eos=True) for s in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    cells: dict[tuple[int, int], int] = {}
    for o in outs:
        key = (o.output_ids[1], o.output_ids[2])
        cells[key] = cells.get(key, 0) + 1
    return cells


def test_draft_model_rejection_sampling_keeps_the_target_distribution(loop_dir: Path, draft_dir: Path,
                                                                      plain: LLM) -> None:
    """Chi-square homogeneity of (2nd, 3rd) tokens: plain vs the draft model's rejection rule (the
    1st token comes from the prefill; the 2nd is a verified draft or the residual draw, the 3rd
    the bonus or the next step's)."""
    prompt = prompts(1, 9, 20, 20)[0]
    n = 600
    a = _pairs(plain, prompt, n, 3)
    llm = spec_llm(loop_dir, "STANDALONE", draft_dir, max_running=16, chunk_budget=128)
    b = _pairs(llm, prompt, n, 3)
    s = llm.engine.speculator.stats
    assert s.draft_tokens > 100 and 0 < s.accepted_tokens < s.draft_tokens  # both branches of the rule ran
    keys = sorted(set(a) | set(b))
    ca = torch.tensor([a.get(k, 0) for k in keys], dtype=torch.float64)
    cb = torch.tensor([b.get(k, 0) for k in keys], dtype=torch.float64)
    expected = (ca + cb) / 2
    chi2 = float((((ca - expected) ** 2 + (cb - expected) ** 2) / expected.clamp_min(1e-9)).sum())
    df = len(keys) - 1
    assert chi2 < df + 4 * (2 * df) ** 0.5 + 10, (chi2, df, a, b)  # ~ the 0.1% tail of chi2(df)


def test_bundled_model_greedy_equals_plain_with_draft_free_proposers(bundled_model_dir: Path) -> None:
    """The real model on prompts it answers by copying (where drafts are accepted) and one it does not."""
    ps = ["red, green, blue, red, green, blue, red, green, blue, red,",
          "def f(x):\n    return x * x + x\n\n\ndef g(x):\n    return x * x + x\n\n\ndef h(x):\n",
          "The capital of France is"]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, logprobs=True, top_logprobs=2)
    cfg = dict(num_pages=128, page_size=16, chunk_budget=128, threads=1)
    ref = LLM(str(bundled_model_dir), **cfg).generate(ps, params, use_tqdm=False)
    for algorithm in ("NGRAM", "SUFFIX"):
        llm = LLM(str(bundled_model_dir), **cfg, speculative=SpecConfig(algorithm=algorithm, adaptive=False))
        assert_same(ref, llm.generate(ps, params, use_tqdm=False))
        assert llm.engine.speculator.stats.accepted_tokens > 0
        llm.engine.check_integrity()
