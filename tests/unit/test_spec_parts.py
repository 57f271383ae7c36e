"""Speculative decoding's parts on their own: the lookups (n-gram, suffix), the draft KV ledger, the
rejection rule's distribution, the adaptive rule's choices, the config and its flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from pdserve.engine.args import add_engine_arguments, check_engine_args, engine_config_from_args
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.adaptive import AdaptivePolicy, StepCost
from pdserve.engine.spec.config import SpecConfig
from pdserve.engine.spec.draft import rejection_tokens
from pdserve.engine.spec.draft_kv import DraftLedger
from pdserve.engine.spec.lookup import NgramProposer, as_array, longest_match
from pdserve.engine.spec.suffix import SuffixProposer


def req(tokens: list[int], prompt_len: int | None = None, rid: str = "r") -> Request:
    return Request(rid, prompt_len if prompt_len is not None else len(tokens), SamplingParams(), tokens=list(tokens))


def test_longest_match_narrows_back_from_the_last_token() -> None:
    seq = as_array([9, 1, 2, 3, 4, 5, 7, 2, 3, 8, 3, 6])
    n, ends = longest_match(seq, as_array([0, 1, 2, 3]), max_len=8)
    assert (n, ends.tolist()) == (3, [3])  # "1 2 3" ends at 3; "2 3" and "3" elsewhere are shorter
    n, ends = longest_match(seq, as_array([5, 2, 3]), max_len=8)
    assert (n, ends.tolist()) == (2, [3, 8])
    assert longest_match(seq, as_array([42]), 4)[0] == 0


def test_ngram_proposes_what_followed_the_latest_occurrence_and_continues_loops() -> None:
    p = NgramProposer(min_n=1, max_n=4)
    assert p.lookup([1, 2, 3, 4, 5, 9, 9, 2, 3, 4], 3) == (5, 9, 9)
    assert p.lookup([5, 1, 2, 3, 4, 6, 1, 2, 3, 4, 8, 1, 2, 3, 4], 3) == (8, 1, 2)  # latest of two
    assert p.lookup([1, 2, 1, 2], 5) == (1, 2, 1, 2, 1)  # a loop goes on with its period
    assert p.lookup([1, 2, 3], 2) == ()  # nothing repeats
    assert NgramProposer(min_n=3, max_n=4).lookup([7, 1, 2, 5, 1, 2], 2) == ()  # "1 2" is under min_n


def test_suffix_votes_across_requests_and_stops_on_low_probability() -> None:
    s = SuffixProposer(max_depth=8, max_cached_requests=2, max_spec_factor=1.0, min_token_prob=0.4)
    for i, out in enumerate(([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 9, 9, 9])):
        s.release(req([0, *out], prompt_len=1, rid=f"r{i}"))
    corpus = s.corpus()  # the oldest output left: at most 2 kept
    assert corpus.tolist() == [1, 2, 3, 4, 5, 7, -1, 1, 2, 3, 9, 9, 9, -1]
    own = as_array([8, 1, 2, 3])  # matches "1 2 3" in both outputs: 4 and 9 half each, then one path
    assert s.lookup(own, corpus, 8) == (4, 5, 7)  # p = 0.5 each; the match's depth 3 caps it at 3 drafts
    s.min_prob = 0.6
    assert s.lookup(own, corpus, 8) == ()  # no continuation is likely enough
    assert s.lookup(as_array([3, 4, 5]), corpus, 8) == (7,)  # then the separator: no crossing
    assert s.lookup(as_array([5, 6, 5, 6, 5]), corpus, 2) == (6, 5)  # its own tokens count too


def test_draft_ledger_tracks_what_the_draft_pool_holds() -> None:
    ledger = DraftLedger(page_size=4)
    a = req(list(range(10, 20)), prompt_len=6)
    a.pages = [5, 6, 7]
    assert ledger.valid(a, 9) == 0
    ledger.wrote(a, [], 0, 10)  # the draft computed every token
    assert ledger.valid(a, 9) == 9
    ledger.wrote(a, [77, 78], 10, 12)  # and two drafts past them
    a.tokens += [20, 21]  # the target took others: the drafts' slots no longer count
    assert ledger.valid(a, 11) == 10
    b = req(list(range(10, 18)) + [40, 41, 42])  # the same first two pages (a radix-cache hit) ...
    b.pages = [5, 6, 9]
    assert ledger.valid(b, 10) == 8  # ... hold the draft's KV; page 9 never had any
    c = req([10, 11, 12, 99, 14, 15, 16, 17])  # page 6 under another first page: another context
    c.pages = [8, 6]
    assert ledger.valid(c, 7) == 0
    ledger.wrote(c, [], 0, 7)  # the draft overwrites page 6 for c: a's entry is gone
    assert ledger.valid(a, 11) == 4 and ledger.valid(c, 7) == 7


def test_rejection_rule_gives_the_target_distribution() -> None:
    """Leviathan et al.: whatever q, the first token is ~ p0, and after an accepted draft ~ p1."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    n, first, second = 20000, torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        drafts = tuple(int(torch.multinomial(q[j], 1, generator=g)) for j in range(2))
        bonus = int(torch.multinomial(p[2], 1, generator=g))
        out = rejection_tokens(p, q, drafts, bonus, g)
        assert 1 <= len(out) <= 3 and all(t == d for t, d in zip(out[:-1], drafts))
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert torch.allclose(first / n, p[0], atol=0.015)
    assert torch.allclose(second / second.sum(), p[1], atol=0.02)


def test_stepcost_interpolates_between_measured_buckets() -> None:
    c = StepCost()
    assert not c.known()
    c.observe(1, 0.05)
    c.observe(16, 0.09)
    assert c.estimate(1) == 0.05 and c.estimate(16) == 0.09
    assert c.estimate(8) == pytest.approx(0.05 + 0.04 * 7 / 15)
    assert c.estimate(32) == pytest.approx(0.18)  # past the last point: proportional
    c.observe(16, 0.19)  # EWMA: a new timing moves the bucket a fifth of the way
    assert c.estimate(16) == pytest.approx(0.11)


def memory_bound() -> StepCost:
    """Flat until 16 tokens (the weights' read dominates), then linear: this CPU's shape."""
    c = StepCost()
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        c.observe(n, 0.05 if n <= 16 else 0.05 * n / 16)
    return c


def test_adaptive_rule_speculates_at_batch_1_and_turns_off_when_compute_bound() -> None:
    policy = AdaptivePolicy(memory_bound())
    one = [req([1, 2, 3])]
    assert policy.choose(1, 1, one, [4]) == [4]  # a verify of 5 costs a plain step: all drafts
    many = [req([1, 2], rid=f"r{i}") for i in range(32)]
    assert policy.choose(32, 32, many, [4] * 32) == [0] * 32  # 32 -> 160 tokens: 5x the time
    some = policy.choose(8, 8, many[:8], [4] * 8)  # 8 rows + drafts up to 16 tokens are free
    assert sum(some) == 8
    for _ in range(10):
        policy.observe(one[0], 4, 0)  # every first draft refused
    policy.global_rate = 0.05
    assert policy.choose(1, 1, one, [4]) == [0]
    for _ in range(40):
        policy.idle(one[0])  # evidence fades: back to the prior, tried again when it is high enough
    policy.global_rate = 0.5
    assert policy.choose(1, 1, one, [4]) == [4]
    assert AdaptivePolicy(memory_bound(), enabled=False).choose(32, 32, many, [3] * 32) == [3] * 32


def test_speculative_config_json_and_flags() -> None:
    c = SpecConfig(config_json='{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3}').resolved()
    assert (c.algorithm, c.draft_model_path, c.num_draft_tokens) == ("STANDALONE", "/m", 3)
    assert SpecConfig(config_json='{"method": "ngram", "prompt_lookup_max": 6}').proposer == "ngram"
    with pytest.raises(ValueError, match="key 'eagle_topk' is not supported"):
        SpecConfig(config_json='{"eagle_topk": 2}').resolved()
    with pytest.raises(ValueError, match="a flag set it to 5"):
        SpecConfig(num_draft_tokens=5, config_json='{"num_speculative_tokens": 3}').resolved()
    with pytest.raises(ValueError, match="unknown speculative algorithm 'eagle'"):
        SpecConfig(config_json='{"method": "eagle"}').resolved()
    with pytest.raises(ValueError, match="goes with --speculative-algorithm STANDALONE"):
        SpecConfig(algorithm="NGRAM", draft_model_path="/m").check()
    with pytest.raises(ValueError, match="over the max"):
        SpecConfig(algorithm="NGRAM", ngram_min=5, ngram_max=3).check()
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-algorithm", "suffix", "--num-speculative-tokens", "6",
                              "--disable-speculative-adaptive", "--speculative-disable-by-batch-size", "8"])
    check_engine_args(args)
    s = engine_config_from_args(args).speculative
    assert (s.algorithm, s.num_draft_tokens, s.adaptive, s.disable_by_batch_size) == ("SUFFIX", 6, False, 8)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert engine_config_from_args(args).speculative.resolved().algorithm == "NGRAM"
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-algorithm", "EAGLE"])
    with pytest.raises(ValueError, match="goes with"):
        check_engine_args(parser.parse_args(["--speculative-algorithm", "NGRAM",
                                             "--speculative-draft-model-path", "/m"]))
