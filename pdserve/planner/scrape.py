"""What the live planner reads of the router each interval: its /metrics as a snapshot, two snapshots as an Observation.

The router counts every answered generation (router/usage.py): prompt and output tokens,
TTFT and ITL histograms, and per worker its in-flight requests and health. Names are
`<prefix>_router_<name>` (the router's --metrics-prefix, default sgl: sglang-router's names):

    generations_total, prompt_tokens_total, output_tokens_total     counters
    ttft_seconds_{sum,count}, itl_seconds_{sum,count}               histograms (streams)
    running_requests{worker,role}, worker_health{worker,role}       gauges

`observation(before, after)` turns the counters' growth over the interval into planner.Observation:
rate (finished requests / interval), mean prompt and output tokens, mean TTFT and ITL of the
requests that finished in it, the healthy prefill and decode workers at its end, and the decode
streams in flight then (the decode correction's concurrency).

    t0 ─────── interval ─────── t1
    snap0                       snap1      requests = gen1 - gen0; prompt = (pt1 - pt0) / requests ...
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from pdserve.planner.planner import Observation

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
COUNTERS = ("generations_total", "prompt_tokens_total", "output_tokens_total", "ttft_seconds_sum",
            "ttft_seconds_count", "itl_seconds_sum", "itl_seconds_count")


def http_get(url: str, api_key: str | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with _OPENER.open(req, timeout=timeout) as resp:
        return resp.read()


@dataclass(frozen=True)
class Snapshot:
    t: float  # time.monotonic() when read
    counters: dict[str, float]  # COUNTERS by short name (0 when absent)
    in_flight: dict[str, float] = field(default_factory=dict)  # role -> requests in flight over its workers
    healthy: dict[str, int] = field(default_factory=dict)  # role -> healthy workers


def parse_metrics(text: str, prefix: str = "sgl", t: float | None = None) -> Snapshot:
    head = f"{prefix}_router_"
    counters = dict.fromkeys(COUNTERS, 0.0)
    in_flight: dict[str, float] = {}
    healthy: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith(head):
                continue
            name = s.name[len(head):]
            if name in counters:
                counters[name] = s.value
            elif name == "running_requests":
                role = s.labels.get("role", "")
                in_flight[role] = in_flight.get(role, 0.0) + s.value
            elif name == "worker_health" and s.value > 0:
                role = s.labels.get("role", "")
                healthy[role] = healthy.get(role, 0) + 1
    return Snapshot(time.monotonic() if t is None else t, counters, in_flight, healthy)


def scrape(router_url: str, prefix: str = "sgl", api_key: str | None = None) -> Snapshot:
    return parse_metrics(http_get(router_url.rstrip("/") + "/metrics", api_key).decode(), prefix)


def _mean(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def observation(before: Snapshot, after: Snapshot) -> Observation:
    d = {k: after.counters[k] - before.counters[k] for k in COUNTERS}
    n = d["generations_total"]
    return Observation(
        t=after.t, interval_s=max(after.t - before.t, 1e-6), requests=int(round(n)),
        prompt_tokens=_mean(d["prompt_tokens_total"], n) or 0.0,
        output_tokens=_mean(d["output_tokens_total"], n) or 0.0,
        ttft_s=_mean(d["ttft_seconds_sum"], d["ttft_seconds_count"]),
        itl_s=_mean(d["itl_seconds_sum"], d["itl_seconds_count"]),
        prefill_workers=after.healthy.get("prefill", 0), decode_workers=after.healthy.get("decode", 0),
        decode_streams=after.in_flight.get("decode", 0.0))
