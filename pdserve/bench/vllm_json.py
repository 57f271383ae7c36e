"""The result file of ``--save-result``, with ``vllm bench serve``'s field names and layout.

Scripts that read vLLM's result JSON read this one: ``date``, ``backend``, ``endpoint_type``,
``label``, ``model_id``, ``tokenizer_id``, ``num_prompts``, ``request_rate`` (``"inf"`` when
unlimited), ``burstiness``, ``max_concurrency``, ``duration``, ``completed``, ``failed``,
``total_input_tokens``, ``total_output_tokens``, ``request_throughput``, ``request_goodput``,
``output_throughput``, ``total_token_throughput``, ``max_output_tokens_per_s``,
``max_concurrent_requests``, and for each of ``--percentile-metrics`` (ttft, tpot, itl, e2el)
``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and ``p<q>_<m>_ms`` for each of
``--metric-percentiles``. With ``--save-detailed`` also the per-request lists ``input_lens``,
``output_lens``, ``ttfts`` (s), ``itls`` (s), ``generated_texts`` (empty: pdserve bench does not
keep texts) and ``errors``. Definitions are those of :mod:`pdserve.bench.metrics`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.runner import BenchResult

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def _values_ms(records: list[RequestRecord], metric: str) -> list[float]:
    ok = [r for r in records if r.success]
    if metric == "ttft":
        return [r.ttft * 1000.0 for r in ok]
    if metric == "tpot":
        return [t * 1000.0 for t in (r.tpot for r in ok) if t is not None]
    if metric == "itl":
        return [g * 1000.0 for r in ok for g in r.itl]
    return [r.latency * 1000.0 for r in ok]


def percentile_key(q: float, metric: str) -> str:
    """vLLM's key: ``p99_ttft_ms``, ``p99.9_itl_ms``."""
    word = str(int(q)) if float(q).is_integer() else str(q)
    return f"p{word}_{metric}_ms"


def max_concurrent(records: list[RequestRecord]) -> int:
    """The most requests in flight at once (from each request's start and end)."""
    events = sorted([(r.start, 1) for r in records] + [(r.start + r.latency, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def backend_name(result: BenchResult) -> str:
    return "openai-chat" if result.config.is_chat else "openai"


def vllm_result(result: BenchResult, percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl"),
                percentiles: tuple[float, ...] = (99.0,), detailed: bool = False, label: str | None = None,
                metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The dict ``--save-result`` writes (see the module docstring)."""
    cfg, s, recs = result.config, result.summary, result.records
    started = _dt.datetime.fromtimestamp(result.started_at)
    out: dict[str, Any] = {
        "date": started.strftime("%Y%m%d-%H%M%S"),
        "backend": backend_name(result),
        "endpoint_type": backend_name(result),
        "label": label,
        "model_id": cfg.model,
        "tokenizer_id": cfg.tokenizer,
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "num_prompts": len(recs),
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "duration": result.duration_s,
        "completed": s["completed"],
        "failed": s["failed"],
        "total_input_tokens": s["total_input_tokens"],
        "total_output_tokens": s["total_output_tokens"],
        "request_throughput": s["request_throughput"],
        "request_goodput": s.get("goodput"),
        "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
        "max_output_tokens_per_s": max(s["time_series"]["output_tok_s"], default=0.0),
        "max_concurrent_requests": max_concurrent(recs),
    }
    for key in ("ttft", "tpot", "e2el"):
        if s.get(f"slo_{key}_ms") is not None:
            out.setdefault("goodput", {})[key] = s[f"slo_{key}_ms"]
    for metric in percentile_metrics:
        values = np.asarray(_values_ms(recs, metric) or [0.0])
        out[f"mean_{metric}_ms"] = float(values.mean())
        out[f"median_{metric}_ms"] = float(np.median(values))
        out[f"std_{metric}_ms"] = float(values.std())
        for q in percentiles:
            out[percentile_key(q, metric)] = float(np.percentile(values, q))
    if detailed:
        out.update({
            "input_lens": [r.prompt_len for r in recs],
            "output_lens": [r.output_tokens for r in recs],
            "ttfts": [r.ttft if r.success else 0.0 for r in recs],
            "itls": [list(r.itl) for r in recs],
            "generated_texts": ["" for _ in recs],
            "errors": [r.error for r in recs],
        })
    if metadata:
        out.update(metadata)
    return out


def default_filename(result: BenchResult) -> str:
    """vLLM's default: ``<backend>-<rate>qps[-concurrency<N>]-<model>-<date>.json``."""
    cfg = result.config
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
    conc = f"-concurrency{cfg.max_concurrency}" if cfg.max_concurrency else ""
    model = Path(str(cfg.model or "model")).name
    date = _dt.datetime.fromtimestamp(result.started_at).strftime("%Y%m%d-%H%M%S")
    return f"{backend_name(result)}-{rate}qps{conc}-{model}-{date}.json"


def write_vllm_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path
