"""pdserve.bench.metrics: summary numbers against hand-computed timelines."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench.metrics import RequestRecord, stats_ms, summarize, time_series


def _rec(start: float, ttft: float, gaps: list[float], output_tokens: int, prompt_len: int = 10) -> RequestRecord:
    """A successful request sent at `start` whose chunks come ttft, then `gaps` apart."""
    times = [start + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord(success=True, prompt_len=prompt_len, output_tokens=output_tokens, start=start, ttft=ttft,
                         latency=times[-1] - start, itl=list(gaps), chunk_times=times)


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        # A: ttft 0.1, 4 tokens, gaps 0.05 0.05 0.2 -> latency 0.4, tpot (0.4-0.1)/3 = 0.1
        _rec(0.0, 0.1, [0.05, 0.05, 0.2], 4, prompt_len=10),
        # B: ttft 0.3, 3 tokens, gaps 0.1 0.1 -> latency 0.5, tpot 0.2/2 = 0.1
        _rec(0.5, 0.3, [0.1, 0.1], 3, prompt_len=20),
        # C: ttft 0.2, 1 token -> latency 0.2, no tpot
        _rec(1.0, 0.2, [], 1, prompt_len=30),
        # D: failed; must not count anywhere but "failed"
        RequestRecord(success=False, error="HTTP 500: boom", prompt_len=999, output_tokens=0, start=1.5,
                      latency=0.01),
    ]


def test_counts_and_throughputs(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 60 and s["total_output_tokens"] == 8
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["input_throughput"] == pytest.approx(30.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(34.0)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["goodput"] is None and s["good_requests"] is None


def test_ttft_e2e_tpot(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=2.0)
    assert s["ttft_ms"]["count"] == 3
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["ttft_ms"]["max"] == pytest.approx(300.0)
    # linear percentile of [100, 200, 300]: p90 = 280, p99 = 298
    assert s["ttft_ms"]["p90"] == pytest.approx(280.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(298.0)
    assert s["e2el_ms"]["mean"] == pytest.approx((400 + 500 + 200) / 3)
    assert s["e2el_ms"]["max"] == pytest.approx(500.0)
    # TPOT only for requests with > 1 output token: A 100 ms, B 100 ms
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert records[0].tpot == pytest.approx(0.1) and records[2].tpot is None


def test_itl_is_pooled_over_requests(records: list[RequestRecord]) -> None:
    s = summarize(records, duration_s=2.0)
    pooled = np.array([50, 50, 200, 100, 100], dtype=float)
    assert s["itl_ms"]["count"] == 5
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["median"] == pytest.approx(100.0)
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(pooled, 90))  # 160
    assert s["itl_ms"]["p90"] == pytest.approx(160.0)
    assert s["itl_ms"]["p99"] == pytest.approx(196.0)
    assert s["itl_ms"]["max"] == pytest.approx(200.0)


def test_itl_pooled_not_averaged_per_request() -> None:
    # A: 4 gaps of 10 ms; B: 1 gap of 110 ms. Pooled mean 30 ms; mean of per-request means would be 60.
    recs = [_rec(0.0, 0.1, [0.01] * 4, 5), _rec(0.0, 0.1, [0.11], 2)]
    assert summarize(recs, duration_s=1.0)["itl_ms"]["mean"] == pytest.approx(30.0)


def test_goodput_with_both_slos(records: list[RequestRecord]) -> None:
    # TTFT <= 250 ms: A (100) and C (200) pass, B (300) fails; TPOT <= 101 ms: A and C (TPOT 0) pass
    s = summarize(records, duration_s=2.0, slo_ttft_ms=250, slo_tpot_ms=101)
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    # tighter TPOT: A (100 ms) fails, C (1 token, TPOT 0) still passes
    s = summarize(records, duration_s=2.0, slo_ttft_ms=250, slo_tpot_ms=99)
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)
    # the SLO bounds are inclusive (exact binary values: TTFT 250 ms, TPOT 125 ms)
    exact = [RequestRecord(success=True, output_tokens=3, ttft=0.25, latency=0.5)]
    assert summarize(exact, 1.0, slo_ttft_ms=250, slo_tpot_ms=125)["good_requests"] == 1
    assert summarize(exact, 1.0, slo_ttft_ms=249.9, slo_tpot_ms=125)["good_requests"] == 0
    # a generous TTFT SLO alone: A, B, C; the failed request never counts
    s = summarize(records, duration_s=4.0, slo_ttft_ms=1e9)
    assert s["good_requests"] == 3 and s["goodput"] == pytest.approx(0.75)


def test_failed_only_and_empty_stats() -> None:
    s = summarize([RequestRecord(success=False, error="x")], duration_s=1.0)
    assert s["completed"] == 0 and s["failed"] == 1
    assert s["output_throughput"] == 0.0
    assert s["itl_ms"] == {"count": 0, "mean": 0.0, "median": 0.0, "std": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    with pytest.raises(ValueError):
        summarize([], duration_s=0.0)


def test_stats_ms_matches_numpy() -> None:
    values = [0.001 * v for v in (3, 1, 4, 1, 5, 9, 2, 6)]
    st = stats_ms(values)
    ms = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=float)
    for key, expected in (("mean", ms.mean()), ("median", np.median(ms)), ("std", ms.std()),
                          ("p90", np.percentile(ms, 90)), ("p99", np.percentile(ms, 99)), ("max", 9.0)):
        assert st[key] == pytest.approx(expected)


def test_time_series_buckets(records: list[RequestRecord]) -> None:
    ts = time_series(records, duration_s=2.0)
    assert ts["t_s"] == [0.0, 1.0]
    # chunk times: A 0.1 0.15 0.2 0.4 (1 token each); B 0.8 0.9 1.0 (1 each); C 1.2 (1)
    # bucket 0: A's 4 + B's 0.8, 0.9 = 6 tokens; bucket 1: B's 1.0 + C = 2
    assert ts["output_tok_s"] == pytest.approx([6.0, 2.0])
    # gaps ending in bucket 0: 50, 50, 200 (A), 100 (B at 0.9); bucket 1: 100 (B at 1.0)
    assert ts["itl_mean_ms"][0] == pytest.approx(100.0) and ts["itl_max_ms"][0] == pytest.approx(200.0)
    assert ts["itl_mean_ms"][1] == pytest.approx(100.0)
    s = summarize(records, duration_s=2.0)
    assert s["time_series"]["output_tok_s"] == ts["output_tok_s"]
