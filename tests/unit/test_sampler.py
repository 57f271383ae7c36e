"""Unit tests for pdserve.engine.sampler (no model; small synthetic logits)."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.messages import TopLogprob
from pdserve.engine.sampler import SampleRow, Sampler, apply_penalties, process_logits
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def row(params: SamplingParams = GREEDY, prompt=(), output=(), suppress=(), seed=None) -> SampleRow:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return SampleRow(params, gen, list(prompt), list(output), tuple(suppress))


def draw_many(
    logits_row: torch.Tensor, params: SamplingParams, n: int = 20000, **kw
) -> torch.Tensor:
    """Sample n times from the same row in one batch; returns counts per token id."""
    sampler = Sampler(logits_row.numel(), torch.device("cpu"))
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    res = sampler.sample(logits, [row(params, **kw) for _ in range(n)])
    return torch.bincount(torch.tensor(res.token_ids), minlength=logits_row.numel()).double()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit on the support of probs; zero-prob tokens must never occur."""
    n = counts.sum()
    probs = probs.double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled outside support: {counts}"
    exp = probs[support] * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    limit = df + 6 * math.sqrt(2 * max(df, 1)) + 5  # far beyond p=1e-4 for these small df
    assert chi2 < limit, f"chi2={chi2:.1f} df={df} counts={counts.tolist()} probs={probs.tolist()}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def test_greedy_is_argmax_fast_path() -> None:
    logits = torch.randn(8, 50)
    sampler = Sampler(50, torch.device("cpu"))
    rows = [row(GREEDY if i % 2 else SamplingParams(top_k=1)) for i in range(8)]
    res = sampler.sample(logits, rows)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs is None and res.top_logprobs is None


def test_padded_vocab_columns_ignored() -> None:
    logits = torch.zeros(2, 12)
    logits[:, 11] = 100.0  # padding column beyond the real vocab
    logits[0, 3] = 1.0
    logits[1, 7] = 1.0
    rows = [row(), row(SamplingParams(seed=1), seed=1)]
    res = Sampler(10, torch.device("cpu")).sample(logits, rows)
    assert res.token_ids[0] == 3 and res.token_ids[1] < 10


def test_logprobs_match_log_softmax_and_topk_sorted() -> None:
    logits = torch.randn(3, 40) * 3
    sampler = Sampler(40, torch.device("cpu"))
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)),
        row(SamplingParams(temperature=0.0)),  # did not ask
        row(SamplingParams(temperature=0.7, logprobs=True, repetition_penalty=1.5), prompt=[1, 2]),
    ]
    res = sampler.sample(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    assert res.logprobs is not None and res.top_logprobs is not None
    for i in (0, 2):
        assert abs(res.logprobs[i] - ref[i, res.token_ids[i]].item()) < 1e-6
    assert res.logprobs[1] == 0.0 and res.top_logprobs[1] == [] and res.top_logprobs[2] == []
    top = res.top_logprobs[0]
    assert len(top) == 5 and all(isinstance(t, TopLogprob) for t in top)
    vals = [t.logprob for t in top]
    assert vals == sorted(vals, reverse=True)
    ref_v, ref_i = ref[0].topk(5)
    assert [t.token_id for t in top] == ref_i.tolist()
    assert max(abs(a - b) for a, b in zip(vals, ref_v.tolist())) < 1e-6
    assert top[0].token_id == res.token_ids[0]


def test_logprobs_are_from_raw_logits_not_processed() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, repetition_penalty=10.0)
    res = Sampler(4, torch.device("cpu")).sample(logits, [row(p, prompt=[0])])
    assert res.token_ids == [1]  # 2.0 / 10 = 0.2 < 1.0
    ref = torch.log_softmax(logits[0], -1)
    assert abs(res.logprobs[0] - ref[1].item()) < 1e-6
    assert [t.token_id for t in res.top_logprobs[0]] == [0, 1]


def test_seeded_sampling_reproducible_and_batch_independent() -> None:
    logits = torch.randn(1, 1000)
    sampler = Sampler(1000, torch.device("cpu"))
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sampler.sample(logits, [row(p, seed=7)]).token_ids[0] for _ in range(3)]
    assert len(set(alone)) == 1
    # Same seed inside a bigger mixed batch, at another position, gives the same token.
    batch = torch.cat([torch.randn(2, 1000), logits, torch.randn(1, 1000)])
    rows = [row(SamplingParams()), row(GREEDY), row(p, seed=7), row(SamplingParams(seed=3), seed=3)]
    assert sampler.sample(batch, rows).token_ids[2] == alone[0]
    # A generator carried across steps reproduces the same sequence.
    def run(seed: int) -> list[int]:
        r = row(SamplingParams(seed=seed), seed=seed)
        return [sampler.sample(logits, [r]).token_ids[0] for _ in range(5)]

    assert run(11) == run(11)


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform
    sampler = Sampler(1000, torch.device("cpu"))
    toks = {
        sampler.sample(logits, [row(SamplingParams(seed=s), seed=s)]).token_ids[0]
        for s in range(20)
    }
    assert len(toks) > 10


def test_temperature_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    for t in (0.5, 1.0, 5.0):
        counts = draw_many(logits, SamplingParams(temperature=t))
        assert_matches(counts, torch.softmax(logits / t, -1))
    # near-zero temperature concentrates on the argmax
    counts = draw_many(logits, SamplingParams(temperature=0.02), n=5000)
    assert counts[0] == 5000
    # high temperature spreads: every token appears, close to uniform
    counts = draw_many(logits, SamplingParams(temperature=100.0), n=5000)
    assert (counts > 800).all()


def test_top_k_never_outside_k_largest() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.5, 2.9, 0.0, 1.0, -2.0])
    counts = draw_many(logits, SamplingParams(temperature=1.5, top_k=3))
    probs = torch.zeros(8)
    keep = torch.tensor([1, 4, 3])
    probs[keep] = torch.softmax(logits[keep] / 1.5, -1)
    assert_matches(counts, probs)
    # top_k 0 / -1 / >= vocab are off
    for k in (0, -1, 100):
        c = draw_many(logits, SamplingParams(top_k=k), n=20000)
        assert_matches(c, torch.softmax(logits, -1))


def test_top_k_exact_count_on_every_path() -> None:
    logits = torch.randn(2, 100)
    batches = {
        "same_k": [3, 3],  # partial sort, K == k
        "bigger_k": [3, 6],  # partial sort, K > k for row 0
        "no_k": [3, -1],  # full sort
    }
    for name, ks in batches.items():
        rows = [row(SamplingParams(temperature=0.9, top_k=k)) for k in ks]
        out = process_logits(logits, rows)
        kept = (out[0] > -math.inf).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(logits[0].topk(3).indices.tolist()), name


def test_top_p_keeps_exact_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    counts = draw_many(logits, SamplingParams(top_p=0.8))
    assert_matches(counts, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    # exact boundary with representable probs: mass 0.75 reaches top_p 0.75 -> two tokens only
    dyadic = torch.tensor([0.5, 0.25, 0.125, 0.125])
    counts = draw_many(dyadic.log(), SamplingParams(top_p=0.75), n=5000)
    assert counts[2] == 0 and counts[3] == 0
    counts = draw_many(logits, SamplingParams(top_p=0.81))
    assert_matches(counts, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    counts = draw_many(logits, SamplingParams(top_p=0.1), n=2000)  # always at least the top one
    assert counts[0] == 2000
    # order must not matter: shuffled vocab
    perm = torch.tensor([2, 0, 3, 1])
    counts = draw_many(logits[perm], SamplingParams(top_p=0.8))
    assert_matches(counts, (torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)[perm])


def test_top_k_then_top_p() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalises to [4/9, 3/9, 2/9]; top_p=0.7 -> 4/9 + 3/9 = 0.78 >= 0.7 keeps two
    counts = draw_many(probs.log(), SamplingParams(top_k=3, top_p=0.7))
    assert_matches(counts, torch.tensor([4.0, 3.0, 0.0, 0.0]) / 7)


def test_min_p_drops_below_threshold() -> None:
    probs = torch.tensor([0.4, 0.3, 0.19, 0.11])
    counts = draw_many(probs.log(), SamplingParams(min_p=0.3))  # threshold 0.12
    assert_matches(counts, torch.tensor([0.4, 0.3, 0.19, 0.0]) / 0.89)
    counts = draw_many(probs.log(), SamplingParams(min_p=0.5))  # threshold 0.2
    assert_matches(counts, torch.tensor([0.4, 0.3, 0.0, 0.0]) / 0.7)


def test_repetition_penalty_exact() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    r = row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[1, 2])
    out = process_logits(logits, [r])
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.25, 3.0, -0.5]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]]))  # input untouched
    # greedy flip: token 3 seen and halved below token 0
    sampler = Sampler(5, torch.device("cpu"))
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [row(p)]).token_ids == [3]
    assert sampler.sample(logits, [row(p, output=[3])]).token_ids == [0]
    # penalty < 1 rewards seen tokens
    p = SamplingParams(temperature=0.0, repetition_penalty=0.5)
    assert sampler.sample(logits, [row(p, prompt=[2])]).token_ids == [3]
    assert sampler.sample(logits, [row(p, prompt=[0])]).token_ids == [0]


def test_frequency_and_presence_penalties_exact() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    rows = [
        row(
            SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
            prompt=[0, 0, 0],
            output=[3, 3, 3, 1],
        ),
        row(SamplingParams(frequency_penalty=-1.0), output=[0, 0]),
    ]
    out = process_logits(logits, rows)
    expected = torch.tensor([[1.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 1.5 - 0.25], [3.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    # prompt tokens do not count for frequency/presence (token 0 of row 0 untouched)
    assert out[0, 0].item() == 1.0
    # greedy flip through the sampler
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert Sampler(4, torch.device("cpu")).sample(logits[:1], [row(p, output=[3])]).token_ids == [2]


def test_apply_penalties_in_place_and_combined_order() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    apply_penalties(logits, [row(p, output=[0, 1, 1], suppress=[2])])
    # rep first (2 -> 1, -1 -> -2), then -count*f - p
    assert torch.allclose(logits, torch.tensor([[1.0 - 1.0 - 0.5, -2.0 - 2.0 - 0.5, -math.inf]]))


def test_suppress_ids_never_sampled() -> None:
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0])
    counts = draw_many(logits, SamplingParams(temperature=2.0), n=5000, suppress=(0, 1))
    assert counts[0] == 0 and counts[1] == 0 and counts.sum() == 5000
    res = Sampler(4, torch.device("cpu")).sample(logits.unsqueeze(0), [row(GREEDY, suppress=(0,))])
    assert res.token_ids == [1]


def test_mixed_batch_greedy_and_sampled() -> None:
    torch.manual_seed(0)
    v = 64
    logits = torch.randn(6, v) * 2
    rows = [
        row(GREEDY),
        row(SamplingParams(temperature=0.8, top_k=5)),
        row(SamplingParams(top_k=1)),
        row(SamplingParams(temperature=1.0, top_p=0.5, seed=5), seed=5),
        row(SamplingParams(temperature=0.0, logprobs=True)),
        row(SamplingParams(min_p=0.2, presence_penalty=1.0), output=[0]),
    ]
    res = Sampler(v, torch.device("cpu")).sample(logits, rows)
    assert len(res.token_ids) == 6
    am = logits.argmax(-1).tolist()
    assert res.token_ids[0] == am[0] and res.token_ids[2] == am[2] and res.token_ids[4] == am[4]
    assert res.token_ids[1] in logits[1].topk(5).indices.tolist()
    processed = process_logits(logits, rows)
    for i in (1, 3, 5):
        assert processed[i, res.token_ids[i]].item() > -math.inf
    # seeded row matches the same row sampled alone
    alone = Sampler(v, torch.device("cpu")).sample(logits[3:4], [row(rows[3].params, seed=5)])
    assert alone.token_ids[0] == res.token_ids[3]
    assert res.logprobs is not None and res.logprobs[0] == 0.0 and res.logprobs[4] != 0.0


def test_empty_batch() -> None:
    res = Sampler(10, torch.device("cpu")).sample(torch.zeros(0, 10), [])
    assert res.token_ids == [] and res.logprobs is None


def test_truncation_same_with_partial_and_full_sort() -> None:
    logits = torch.randn(2, 100) * 2
    a = row(SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05))
    b = row(SamplingParams(top_p=0.5))  # no top-k: forces the full-sort path for the batch
    alone = process_logits(logits[:1], [a])
    batched = process_logits(logits, [a, b])
    assert torch.equal(alone[0], batched[0])
    kept = alone[0] > -math.inf
    assert 1 <= int(kept.sum()) <= 10
    assert set(kept.nonzero().flatten().tolist()) <= set(logits[0].topk(10).indices.tolist())


def test_seeded_token_independent_of_truncation_path() -> None:
    v = 200
    logits = torch.randn(1, v) * 2
    sampler = Sampler(v, torch.device("cpu"))
    p = SamplingParams(temperature=1.3, top_k=20, top_p=0.95)
    others = {
        "alone": [],
        "bigger_k": [row(SamplingParams(top_k=50))],  # partial sort with more candidates
        "no_k": [row(SamplingParams(top_p=0.5))],  # full sort
        "greedy": [row(GREEDY)],
    }
    for seed in range(10):
        toks = set()
        for extra in others.values():
            batch = torch.cat([torch.randn(len(extra), v), logits])
            res = sampler.sample(batch, extra + [row(p, seed=seed)])
            toks.add(res.token_ids[-1])
        assert len(toks) == 1, (seed, toks)


def test_logit_bias_forces_and_bans_tokens() -> None:
    sampler = Sampler(8, torch.device("cpu"))
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 3)
    force = SamplingParams(temperature=0.0, logit_bias={6: 100.0})
    ban = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    sampled = SamplingParams(temperature=1.0, logit_bias={3: 100.0}, logprobs=True)
    res = sampler.sample(logits.clone(), [row(force), row(ban), row(sampled, seed=1)])
    assert res.token_ids == [6, 1, 3]
    assert res.logprobs is not None and res.logprobs[2] == pytest.approx(torch.log_softmax(logits[2], -1)[3].item())
    out = process_logits(logits, [row(force), row(GREEDY), row(ban)])
    assert out[0, 6].item() == 100.0 and out[1].tolist() == logits[1].tolist() and out[2, 0].item() == -95.0


def test_skip_draw_consumes_exactly_one_sampled_draw() -> None:
    from pdserve.engine.sampler import skip_draw

    sampler = Sampler(8, torch.device("cpu"))
    logits = torch.randn(1, 8)
    p = SamplingParams(temperature=0.9, seed=3)
    g_uni = torch.Generator().manual_seed(3)
    first, second = (sampler.sample(logits.clone(), [SampleRow(p, g_uni, [1], [])]).token_ids[0] for _ in range(2))
    g_dec = torch.Generator().manual_seed(3)
    skip_draw(p, g_dec, 8)  # the decode got `first` from the prefill
    assert sampler.sample(logits.clone(), [SampleRow(p, g_dec, [1], [])]).token_ids[0] == second
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    skip_draw(GREEDY, g, 8)  # greedy rows draw nothing
    assert torch.equal(g.get_state(), state)


def test_sampling_params_accepts_vllm_names() -> None:
    p = SamplingParams(max_tokens=5, min_tokens=2, logprobs=3, temperature=0.0)
    assert (p.max_new_tokens, p.min_new_tokens, p.logprobs, p.top_logprobs) == (5, 2, True, 3)
    assert p.max_tokens is None and p.min_tokens is None
    import msgspec

    again = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert again == p and msgspec.structs.replace(p, seed=1).max_new_tokens == 5
    assert SamplingParams(logprobs=True).top_logprobs == 0 and SamplingParams(logprobs=None).logprobs is False
    from pdserve.engine.sampling_params import SamplingError

    with pytest.raises(SamplingError, match="n = 2"):
        SamplingParams(n=2).validate()
    with pytest.raises(SamplingError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0}).validate()
