"""Metrics that mean what SGLang's and sglang-router's mean: token usage leaves out evictable
cached pages, time per output token is per request, the router's names are `sgl_router_*` and
closed label sets start at 0."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from pdserve import SamplingParams
from pdserve.engine.messages import LoadInfo, TokenOut
from pdserve.router.metrics import RouterMetrics
from pdserve.server.metrics import RequestTimer, ServerMetrics


def _samples(text: bytes | str) -> dict[str, float]:
    text = text.decode() if isinstance(text, bytes) else text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_token_usage_leaves_out_evictable_cached_pages(tiny_llm) -> None:
    engine = tiny_llm.engine
    tiny_llm.generate(["a prompt long enough to fill a few pages of four tokens"],
                      SamplingParams(max_new_tokens=4, temperature=0), use_tqdm=False)
    load = engine.load()
    assert load.cached_pages > 0 and load.evictable_pages == load.cached_pages
    assert load.kv_usage == 0.0  # warm but idle: everything cached can be evicted (SGLang reads 0 too)
    assert load.free_pages < load.num_pages  # the old reading, 1 - free/total, would not be 0
    metrics = ServerMetrics("m")
    metrics.set_load(load, 0)
    got = _samples(metrics.render())
    assert got["sglang:token_usage{}"] == 0.0 and got["sglang:num_used_tokens{}"] == 0.0
    assert got["sglang:num_cached_tokens{}"] == load.cached_pages * load.page_size


def test_token_usage_counts_pages_requests_hold() -> None:
    load = LoadInfo(num_running=1, num_waiting=0, num_pages=100, free_pages=50, cached_pages=30, page_size=16,
                    evictable_pages=20)
    assert load.kv_usage == 0.3  # 100 - 50 free - 20 evictable


def test_time_per_output_token_is_sglangs_per_request_figure() -> None:
    metrics = ServerMetrics("m")
    timer = RequestTimer(metrics)
    timer.tokens(1)
    first = timer.first_token_at
    time.sleep(0.05)
    timer.tokens(4)
    e2e = timer.finish(TokenOut(rid="r", token_ids=[], finish_reason="length"), 10, 5)
    got = _samples(metrics.render())
    assert got["sglang:time_per_output_token_seconds_count{}"] == 1
    assert abs(got["sglang:time_per_output_token_seconds_sum{}"] - (timer.start + e2e - first) / 4) < 1e-6


def test_router_names_are_sglang_routers_and_closed_labels_start_at_zero() -> None:
    metrics = RouterMetrics()
    metrics.request_done("/v1/chat/completions", 200, 0.1)
    metrics.request_done("/v1/chat/completions", 503, 0.1)
    got = _samples(metrics.render([], 0, 0))
    assert got["sgl_router_requests_total{route=/v1/chat/completions,status=200}"] == 1
    assert got["sgl_router_request_errors_total{error_type=503,route=/v1/chat/completions}"] == 1
    assert got["sgl_router_request_duration_seconds_count{route=/v1/chat/completions}"] == 2
    for decision in ("remote", "local_threshold", "local_queue"):
        assert got[f"sgl_router_pd_decisions_total{{decision={decision}}}"] == 0
    assert got["sgl_router_migrations_total{outcome=ok}"] == 0 and got["sgl_router_active_workers{}"] == 0
    assert not [k for k in got if not k.startswith("sgl_router_")]
    assert set(_samples(RouterMetrics("pdserve").render([], 0, 0))) == {
        k.replace("sgl_router_", "pdserve_router_") for k in _samples(RouterMetrics().render([], 0, 0))}
