"""Per-request records and the benchmark summary (vLLM ``bench serve`` definitions).

Times in a :class:`RequestRecord` are seconds; ``start`` and ``chunk_times`` count from the
benchmark start (the first request's scheduled arrival), so records of one run share a clock.

Definitions used by :func:`summarize` (successful requests only, except the counts):

- TTFT: send → first streamed chunk with text;
- ITL: gaps between consecutive text chunks, pooled over all requests;
- TPOT per request: (latency − TTFT) / (output_tokens − 1), for requests with > 1 output token;
- E2E latency: send → end of the stream;
- throughputs: totals / ``duration_s`` (requests, input tokens, output tokens, both);
- goodput: requests meeting every given SLO (TTFT ≤ ``slo_ttft_ms``, TPOT ≤ ``slo_tpot_ms``,
  E2E ≤ ``slo_e2el_ms``; a 1-token request has TPOT 0) per second; None when no SLO is given.

Each latency metric is reported in ms as ``{"count", "mean", "median", "std", "p90", "p99",
"max"}`` (numpy percentiles, linear interpolation; all 0 when there is no sample), under
``ttft_ms``, ``tpot_ms``, ``itl_ms`` and ``e2el_ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAT_KEYS = ("mean", "median", "std", "p90", "p99", "max")
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@dataclass
class RequestRecord:
    """What one benchmark request did (filled in by the client)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    group: int | None = None

    @property
    def tpot(self) -> float | None:
        """(latency − TTFT) / (output_tokens − 1) in seconds; None with fewer than 2 tokens."""
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """Mean, median, std, p90, p99, max (and count) of ``values_s`` seconds, in ms."""
    if not values_s:
        return {"count": 0, **{k: 0.0 for k in STAT_KEYS}}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "median": float(np.percentile(a, 50)),
        "std": float(a.std()),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
              slo_e2el_ms: float | None = None) -> bool:
    """True when a successful ``record`` meets every SLO given (None = no SLO on that metric)."""
    if not record.success:
        return False
    if slo_ttft_ms is not None and record.ttft * 1000.0 > slo_ttft_ms:
        return False
    if slo_e2el_ms is not None and record.latency * 1000.0 > slo_e2el_ms:
        return False
    tpot = record.tpot or 0.0
    return slo_tpot_ms is None or tpot * 1000.0 <= slo_tpot_ms


def time_series(records: list[RequestRecord], duration_s: float, bucket_s: float = 1.0) -> dict[str, Any]:
    """Per ``bucket_s`` bucket: output tokens/s and mean/max ITL (ms) of the gaps ending there.

    A request's output tokens are spread evenly over its text chunks (a chunk may carry more
    than one token). ITL entries are None for buckets without a gap. ``t_s`` is each bucket's
    start; the last bucket's rate uses its actual width when the run ends inside it.
    """
    ok = [r for r in records if r.success]
    end = max([duration_s] + [t for r in ok for t in r.chunk_times])
    n = max(1, math.ceil(end / bucket_s - 1e-9))
    tokens = np.zeros(n)
    gaps: list[list[float]] = [[] for _ in range(n)]
    for r in ok:
        if not r.chunk_times:
            continue
        per_chunk = r.output_tokens / len(r.chunk_times)
        for k, t in enumerate(r.chunk_times):
            b = min(n - 1, max(0, int(t // bucket_s)))
            tokens[b] += per_chunk
            if 0 < k <= len(r.itl):
                gaps[b].append(r.itl[k - 1])
    widths = [min(bucket_s, end - i * bucket_s) if end > i * bucket_s else bucket_s for i in range(n)]
    return {
        "bucket_s": bucket_s,
        "t_s": [i * bucket_s for i in range(n)],
        "output_tok_s": [float(tokens[i] / w) if w > 0 else 0.0 for i, w in enumerate(widths)],
        "itl_mean_ms": [float(np.mean(g) * 1000.0) if g else None for g in gaps],
        "itl_max_ms": [float(np.max(g) * 1000.0) if g else None for g in gaps],
    }


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, slo_e2el_ms: float | None = None) -> dict[str, Any]:
    """The benchmark summary of ``records`` over a run of ``duration_s`` seconds (see module doc)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    any_slo = slo_ttft_ms is not None or slo_tpot_ms is not None or slo_e2el_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms, slo_e2el_ms) for r in ok) if any_slo else None
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "slo_e2el_ms": slo_e2el_ms,
        "good_requests": good,
        "goodput": good / duration_s if good is not None else None,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([t for t in (r.tpot for r in ok) if t is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in ok]),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "time_series": time_series(records, duration_s),
    }
