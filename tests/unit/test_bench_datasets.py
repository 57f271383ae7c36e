"""pdserve.bench.datasets: exact token lengths with the bundled tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pdserve.bench.datasets import BenchRequest, random_requests, shared_prefix_requests, sharegpt_requests


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path):
    from pdserve.model.tokenizer import Tokenizer

    return Tokenizer(bundled_model_dir)


def _no_special(tok, ids: list[int]) -> bool:
    added = set(tok.hf.added_tokens_decoder)
    return all(0 <= i < tok.vocab_size and i not in added and i not in tok.all_special_ids for i in ids)


def test_random_fixed_lengths_are_exact_ids(tok) -> None:
    reqs = random_requests(tok, 12, input_len=64, output_len=8, seed=0)
    assert len(reqs) == 12
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 64
        assert r.output_len == 8 and r.group is None
        assert _no_special(tok, r.prompt)
    assert len({tuple(r.prompt) for r in reqs}) == 12  # all different


def test_random_ranged_lengths(tok) -> None:
    reqs = random_requests(tok, 40, input_len=64, output_len=16, range_ratio=0.5, seed=1)
    in_lens = [r.prompt_len for r in reqs]
    out_lens = [r.output_len for r in reqs]
    assert all(32 <= n <= 96 for n in in_lens) and len(set(in_lens)) > 5
    assert all(8 <= n <= 24 for n in out_lens) and len(set(out_lens)) > 3
    assert all(len(r.prompt) == r.prompt_len for r in reqs)


def test_random_prefix_is_shared(tok) -> None:
    reqs = random_requests(tok, 5, input_len=20, output_len=4, seed=2, prefix_len=30)
    assert all(r.prompt_len == len(r.prompt) == 50 for r in reqs)
    assert len({tuple(r.prompt[:30]) for r in reqs}) == 1
    assert len({tuple(r.prompt[30:]) for r in reqs}) == 5


def test_random_as_text_is_exact(tok) -> None:
    fixed = random_requests(tok, 10, input_len=100, output_len=4, seed=3, as_text=True)
    ranged = random_requests(tok, 10, input_len=100, output_len=4, range_ratio=0.3, seed=4, as_text=True)
    assert all(r.prompt_len == 100 for r in fixed)
    for r in fixed + ranged:
        assert isinstance(r.prompt, str)
        assert len(tok.encode(r.prompt)) == r.prompt_len  # what the server counts
    assert all(70 <= r.prompt_len <= 130 for r in ranged)


def test_random_is_seeded(tok) -> None:
    a = random_requests(tok, 4, 16, 4, range_ratio=0.5, seed=9)
    assert a == random_requests(tok, 4, 16, 4, range_ratio=0.5, seed=9)
    assert a != random_requests(tok, 4, 16, 4, range_ratio=0.5, seed=10)


def test_shared_prefix_groups(tok) -> None:
    reqs = shared_prefix_requests(tok, num_groups=3, prompts_per_group=4, system_prompt_len=48, question_len=8,
                                  output_len=6, seed=0)
    assert len(reqs) == 12 and Counter(r.group for r in reqs) == {0: 4, 1: 4, 2: 4}
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 56 and r.output_len == 6
               for r in reqs)
    prefixes = {g: {tuple(r.prompt[:48]) for r in reqs if r.group == g} for g in range(3)}
    assert all(len(p) == 1 for p in prefixes.values())  # shared within a group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # different across groups
    assert len({tuple(r.prompt[48:]) for r in reqs}) == 12  # every question differs
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # shuffled (seeded)


def test_shared_prefix_as_text(tok) -> None:
    reqs = shared_prefix_requests(tok, 2, 3, system_prompt_len=40, question_len=10, output_len=4, seed=1,
                                  as_text=True)
    for r in reqs:
        assert isinstance(r.prompt, str) and len(tok.encode(r.prompt)) == r.prompt_len
        assert abs(r.prompt_len - 50) <= 2
    for g in (0, 1):
        texts = [r.prompt for r in reqs if r.group == g]
        common = min(len(t) for t in texts)
        while common and len({t[:common] for t in texts}) > 1:
            common -= 1
        assert len(tok.encode(texts[0][:common])) >= 38  # the system text is shared


def _conv(human: str, gpt: str, first: str | None = None) -> dict:
    turns = ([{"from": "system", "value": first}] if first else []) + [
        {"from": "human", "value": human}, {"from": "gpt", "value": gpt}, {"from": "human", "value": "more?"}]
    return {"id": "x", "conversations": turns}


def test_sharegpt(tok, tmp_path: Path) -> None:
    good = [_conv(f"Question {i}: explain how rainbows form over the ocean in detail.",
                  f"Answer {i}: sunlight refracts in water droplets and splits into colours.") for i in range(5)]
    with_system = _conv("Tell me about the moon and its phases please.", "The moon has phases because it orbits.",
                        first="You are helpful.")
    data = good + [with_system,
                   _conv("Hi", "Hello there, how can I help you today my friend?"),   # prompt < 4 tokens
                   _conv("Tell me a long story about dragons please.", "No."),         # output < 4 tokens
                   _conv("word " * 1100, "a reasonably long answer to the question"),  # prompt > 1024
                   _conv("Summarize: " + "cat " * 600, "dog " * 1500),               # total > 2048
                   {"conversations": [{"from": "human", "value": "no answer here at all"}]},
                   {"no": "conversations"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(path, tok, num=100, seed=0)
    assert len(reqs) == 6
    by_prompt = {r.prompt: r for r in reqs}
    assert set(by_prompt) == {c["conversations"][0]["value"] for c in good} | {with_system["conversations"][1]["value"]}
    for entry in good + [with_system]:
        turns = [t for t in entry["conversations"] if t["from"] != "system"]
        r = by_prompt[turns[0]["value"]]
        assert r.prompt_len == len(tok.encode(turns[0]["value"]))
        assert r.output_len == len(tok.encode(turns[1]["value"], add_special_tokens=False))
    assert all(isinstance(r, BenchRequest) and r.group is None for r in reqs)
    # num caps the count; the order is a seeded shuffle; a fixed output length overrides the answer's
    # (keeping "No." and the 600-cat prompt, whose total is now under 2048)
    assert len(sharegpt_requests(path, tok, num=3, seed=0)) == 3
    assert sharegpt_requests(path, tok, num=3, seed=0) == sharegpt_requests(path, tok, num=3, seed=0)
    fixed = sharegpt_requests(path, tok, num=100, seed=0, fixed_output_len=5)
    assert len(fixed) == 8 and all(r.output_len == 5 for r in fixed)
