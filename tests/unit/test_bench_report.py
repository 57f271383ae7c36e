"""`pdserve bench` plots, checked through matplotlib's objects (titles, labels, legends, ticks,
lines), and the vLLM-format result dict."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pdserve.bench.metrics import RequestRecord, summarize
from pdserve.bench.report import figures, format_table, rolling_throughput
from pdserve.bench.runner import BenchConfig, BenchResult
from pdserve.bench.vllm_json import default_filename, max_concurrent, vllm_result

STARTED = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def _slow_run(gap_s: float = 3.0, n: int = 6, tokens: int = 12) -> BenchResult:
    """A slow server: each request streams one token every `gap_s` seconds, plus a few fast gaps
    so the ITL spans three decades (log axis)."""
    records = []
    for i in range(n):
        start = i * 0.04
        itl = [0.005, 0.02] + [gap_s] * (tokens - 3)
        ttft = 0.2
        times = [start + ttft]
        for g in itl:
            times.append(times[-1] + g)
        records.append(RequestRecord(success=True, prompt_len=32, output_tokens=tokens, start=start, ttft=ttft,
                                     latency=times[-1] - start, itl=itl, chunk_times=times))
    duration = max(r.chunk_times[-1] for r in records)
    cfg = BenchConfig(base_url="http://127.0.0.1:30000", model="default", tokenizer="default", num_prompts=n,
                      input_len=32, output_len=tokens, request_rate=2.0, max_concurrency=4)
    return BenchResult(cfg, summarize(records, duration, slo_ttft_ms=500), records, duration, STARTED)


@pytest.fixture(scope="module")
def figs() -> dict:
    return figures(_slow_run())


def test_every_plot_says_which_run_it_shows(figs: dict) -> None:
    assert set(figs) == {"itl_distribution", "ttft_distribution", "output_throughput_over_time", "itl_over_time"}
    for fig in figs.values():
        title = fig._suptitle.get_text().replace("\n", " · ")
        for part in ("http://127.0.0.1:30000/v1/completions", "model default", "2 req/s", "concurrency 4",
                     "6 requests", "in 32 / out 12 tokens", "2026-01-01 00:00 UTC"):
            assert part in title, (part, title)
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_distribution_panels_have_legends_with_percentiles(figs: dict) -> None:
    for stem in ("itl_distribution", "ttft_distribution"):
        hist_ax, cdf_ax = figs[stem].axes
        for ax in (hist_ax, cdf_ax):
            legend = ax.get_legend()
            assert legend is not None, (stem, ax.get_title())
            texts = [t.get_text() for t in legend.get_texts()]
            assert any(t.startswith("p50 ") for t in texts) and any(t.startswith("p99 ") for t in texts), texts


def test_log_scale_ticks_are_readable(figs: dict) -> None:
    cdf_ax = figs["itl_distribution"].axes[1]
    assert cdf_ax.get_xscale() == "log"
    fig = figs["itl_distribution"]
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = cdf_ax.get_xlim()
    labels = [t for t in cdf_ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert 3 <= len(labels) <= 15
    for t in labels:  # plain 1-2-5 numbers, no 10^x mathtext
        assert "$" not in t.get_text() and float(t.get_text()) > 0
        assert f"{float(t.get_text()):g}"[0] in "125"
    assert all(t.get_text() == "" for t in cdf_ax.get_xminorticklabels())
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 <= b.x0, "tick labels overlap"


def test_throughput_is_a_rolling_window_not_a_comb(figs: dict) -> None:
    result = _slow_run()
    grid, rate, window = rolling_throughput(result)
    assert 2.0 <= window <= 30.0
    inside = (grid >= window) & (grid <= result.duration_s - window)
    assert inside.any() and (rate[inside] > 0).all()  # 1 s buckets would be mostly empty here
    buckets = np.asarray(result.summary["time_series"]["output_tok_s"])
    assert (buckets == 0).sum() > len(buckets) // 3  # ... as the 1 s buckets show
    ax = figs["output_throughput_over_time"].axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 50]
    assert len(lines) == 1 and "rolling" in lines[0].get_label()
    assert ax.get_legend() is not None and "rolling" in ax.get_title()
    assert rate.max() <= 3 * result.summary["total_output_tokens"] / window  # an average, not spikes


def test_mean_itl_is_drawn_above_max(figs: dict) -> None:
    ax = figs["itl_over_time"].axes[0]
    by_label = {ln.get_label(): ln for ln in ax.get_lines()}
    assert by_label["mean per 1 s"].get_zorder() > by_label["max per 1 s"].get_zorder()
    assert by_label["max per 1 s"].get_linestyle() == "--"
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"mean per 1 s", "max per 1 s", "each gap"}


def test_vllm_result_fields() -> None:
    result = _slow_run()
    data = vllm_result(result, ("ttft", "tpot", "itl", "e2el"), (50.0, 99.0, 99.9), detailed=True, label="x",
                       metadata={"note": "y"})
    for key in ("date", "backend", "endpoint_type", "label", "model_id", "tokenizer_id", "num_prompts",
                "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
                "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
                "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
                "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors", "note"):
        assert key in data, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for key in ("mean", "median", "std", "p50", "p99", "p99.9"):
            assert f"{key}_{metric}_ms" in data, (key, metric)
    assert data["median_ttft_ms"] == pytest.approx(200.0)
    assert data["completed"] == 6 and data["num_prompts"] == 6 and data["request_rate"] == 2.0
    assert data["request_goodput"] == pytest.approx(6 / result.duration_s)
    assert data["date"] == "20260101-000000" or len(data["date"]) == 15
    assert data["ttfts"] == [pytest.approx(0.2)] * 6 and data["output_lens"] == [12] * 6
    assert max_concurrent(result.records) == 6
    assert default_filename(result).startswith("openai-2qps-concurrency4-default-")
    brief = vllm_result(result)
    assert "ttfts" not in brief and "p99_ttft_ms" in brief and "mean_e2el_ms" not in brief


def test_table_follows_percentile_flags() -> None:
    text = format_table(_slow_run(), ("ttft", "e2el"), (50.0, 99.9))
    assert "P50 TTFT (ms):" in text and "P99.9 E2EL (ms):" in text
    assert "ITL" not in text and "P90" not in text


def test_compare_and_benchmark_bar_plots_name_their_run(tmp_path, monkeypatch) -> None:
    """plot_compare and benchmarks/multi_turn.py's bar charts: every figure's title says which run
    it shows (machine, model, load, date)."""
    import argparse
    import importlib.util
    from pathlib import Path

    from matplotlib.figure import Figure

    from pdserve.bench.report import machine, plot_compare

    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (titles.append(fig._suptitle.get_text()),
                                                                  save(fig, *a, **k)))
    run = _slow_run()
    plot_compare({"pd": run, "unified": run}, tmp_path, "cmp")
    spec = importlib.util.spec_from_file_location(
        "multi_turn", Path(__file__).resolve().parents[2] / "benchmarks" / "multi_turn.py")
    multi_turn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multi_turn)
    args = argparse.Namespace(model="default", conversations=24, turns=5, rate=0.1, reply_len=48, seed=0)
    rows = [{"system": s, "ttft_p50": 1.0, "ttft_p99": 2.0, "itl_p50": 1.0, "itl_p99": 2.0, "kv_bytes_per_req": 3.0,
             "goodput": 0.5} for s in ("unified", "pd")]
    multi_turn.plot_bars(rows, tmp_path, multi_turn.run_title(args, STARTED))
    assert len(titles) == 3 + 4
    for title in titles:
        flat = title.replace("\n", " · ")
        assert machine() in flat and "model default" in flat and "2026-01-01 00:00 UTC" in flat, flat
    for title in titles[:3]:
        assert "2 req/s" in title.replace("\n", " ") and "pd, unified" in title
    for title in titles[3:]:
        assert "24 conversations x 5 turns" in title.replace("\n", " ") and "0.1/s" in title
