"""`pdserve bench` against the shared bundled-model server: CLI, JSON, plots, Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import wait_idle

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("itl_distribution.png", "ttft_distribution.png", "output_throughput_over_time.png", "itl_over_time.png")


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


def _positive_stats(stats: dict) -> None:
    assert stats["count"] > 0
    for key in ("mean", "median", "p90", "p99", "max"):
        assert stats[key] > 0, (key, stats)
    assert stats["median"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_bench_cli_writes_json_and_plots(base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    out = tmp_path / "res"
    rc = main(["bench", "--base-url", base_url, "--num-prompts", "6", "--random-input-len", "16",
               "--random-output-len", "8", "--request-rate", "20", "--warmup-requests", "2",
               "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--disable-tqdm", "--result-dir", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Mean ITL (ms):" in table
    data = json.loads((out / "bench.json").read_text())
    s = data["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 6 * 8 and s["total_input_tokens"] == 6 * 16
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms"):
        _positive_stats(s[key])
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert s["good_requests"] == 6 and s["goodput"] > 0
    assert sum(s["time_series"]["output_tok_s"]) > 0
    assert data["config"]["model"] == "default" and data["config"]["request_rate"] == 20.0
    assert len(data["requests"]) == 6
    for r in data["requests"]:
        assert r["success"] and r["output_tokens"] == 8 and r["prompt_len"] == 16
        assert 0 < r["ttft"] < r["latency"] and len(r["chunk_times"]) == len(r["itl"]) + 1
    for name in PLOTS:
        _check_png(out / name)
    wait_idle(base_url)


def test_bench_save_result_with_vllm_field_names(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's flags: --save-result --result-filename F writes F with vLLM's field names; the
    plots land next to it, named after it."""
    from pdserve.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--base-url", base_url, "--backend", "openai", "--num-prompts", "4", "--random-input-len",
               "16", "--random-output-len", "6", "--max-concurrency", "2", "--num-warmups", "1", "--disable-tqdm",
               "--save-result", "--result-filename", "run.json", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metric-percentiles", "50,99", "--goodput", "ttft:60000", "tpot:60000"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "P50 E2EL (ms):" in table and "P99 TTFT (ms):" in table
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["completed"] == 4 and data["num_prompts"] == 4 and data["failed"] == 0
    assert data["total_input_tokens"] == 4 * 16 and data["total_output_tokens"] == 4 * 6
    assert data["model_id"] == "default" and data["request_rate"] == "inf" and data["max_concurrency"] == 2
    assert data["request_goodput"] > 0 and data["output_throughput"] > 0 and data["duration"] > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert data[f"median_{metric}_ms"] <= data[f"p99_{metric}_ms"]
        assert data[f"mean_{metric}_ms"] > 0 and f"p50_{metric}_ms" in data and f"std_{metric}_ms" in data
    assert not (tmp_path / "bench.json").exists()
    for name in PLOTS:
        _check_png(tmp_path / f"run_{name}")
    wait_idle(base_url)


def test_bench_python_api_chat_and_compare(base_url: str, tmp_path: Path) -> None:
    from pdserve.bench.report import plot_compare, read_json, write_json
    from pdserve.bench.runner import BenchConfig, run

    base = BenchConfig(base_url=base_url, num_prompts=3, input_len=12, output_len=4, max_concurrency=2,
                       warmup=0, disable_tqdm=True, tokenizer="default")
    completions = run(base)
    chat = run(BenchConfig(**{**base.__dict__, "endpoint": "/v1/chat/completions"}))
    for result in (completions, chat):
        assert result.summary["completed"] == 3 and result.summary["total_output_tokens"] == 12
        assert result.duration_s > 0 and result.summary["ttft_ms"]["mean"] > 0
    assert all(r.prompt_len == 12 for r in chat.records)  # text prompts fixed up to exactly 12 tokens
    paths = plot_compare({"completions": completions, "chat": chat}, tmp_path, "cmp")
    assert [p.name for p in paths] == ["cmp_itl_cdf.png", "cmp_ttft_cdf.png", "cmp_output_throughput_over_time.png"]
    for p in paths:
        _check_png(p)
    again = read_json(write_json(chat, tmp_path / "chat.json"))
    assert again.config == chat.config and again.summary["completed"] == 3
    assert [r.output_tokens for r in again.records] == [r.output_tokens for r in chat.records]
    wait_idle(base_url)
