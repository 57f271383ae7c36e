"""Prometheus metrics of one server (own registry, so several apps can live in one process).

Created with the app; request handlers report through `RequestTimer` (one per engine request:
first token → TTFT, each later token → ITL, finish → E2E, token counters, finish reasons);
`/metrics` refreshes the engine gauges from `/get_load` data and renders the text format.
The engine's cumulative PD transfer figures are exported as counters (`TransferCounters`
yields the last snapshot as counter families, so `rate()` works on them).
"""

from __future__ import annotations

import time

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from pdserve.engine.messages import LoadInfo, TransferStats

disable_created_metrics()  # no `*_created` series: they double the scrape for no use here

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                    2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class TransferCounters:
    """A collector over the engine's cumulative TransferStats (the engine owns the counting)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: TransferStats | None = None

    def collect(self) -> Iterator[Metric]:
        x = self.stats
        if x is None:
            return
        m = [self.model_name]
        rooms = CounterMetricFamily("pdserve:kv_transfers", "PD KV transfers ended, by result",
                                    labels=["model_name", "result"])
        rooms.add_metric(m + ["success"], x.success)
        rooms.add_metric(m + ["failed"], x.failed)
        yield rooms
        nbytes = CounterMetricFamily("pdserve:kv_transfer_bytes", "KV bytes moved by successful PD transfers",
                                     labels=["model_name"])
        nbytes.add_metric(m, x.bytes)
        yield nbytes
        secs = CounterMetricFamily("pdserve:kv_transfer_seconds", "Sum of room start -> transfer success times",
                                   labels=["model_name"])
        secs.add_metric(m, x.latency_sum_s)
        yield secs
        rec = CounterMetricFamily("pdserve:kv_transfer_recomputed", "Failed transfers the decode recomputed",
                                  labels=["model_name"])
        rec.add_metric(m, x.recomputed)
        yield rec


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self._requests = Counter("pdserve:requests", "HTTP generation requests received",
                                 labels + ["endpoint"], registry=r)
        self._finished = Counter("pdserve:request_finished", "Engine requests finished, by reason",
                                 labels + ["finished_reason"], registry=r)
        self._errors = Counter("pdserve:request_errors", "Generation requests rejected or failed",
                               labels + ["status"], registry=r)
        self._prompt = Counter("pdserve:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self._gen = Counter("pdserve:generation_tokens", "Tokens generated", labels, registry=r)
        self._cached = Counter("pdserve:cached_tokens", "Prompt tokens served from the prefix cache",
                               labels, registry=r)
        self._running = Gauge("pdserve:num_running_reqs", "Requests in the running batch", labels, registry=r)
        self._waiting = Gauge("pdserve:num_waiting_reqs", "Requests waiting for admission", labels, registry=r)
        self._kv = Gauge("pdserve:kv_cache_usage", "Fraction of KV pages not free (in use or cached)",
                         labels, registry=r)
        self._free = Gauge("pdserve:kv_free_pages", "Free KV pages", labels, registry=r)
        self._in_flight = Gauge("pdserve:num_in_flight_reqs", "Engine requests the front is waiting on",
                                labels, registry=r)
        self._ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", labels,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("pdserve:inter_token_latency_seconds", "Time between output tokens", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency", labels,
                              buckets=_E2E_BUCKETS, registry=r)
        self._xfer = TransferCounters(model_name)
        r.register(self._xfer)
        self._xfer_latency = Gauge("pdserve:kv_transfer_latency_seconds_mean",
                                   "Mean time from room start to transfer success", labels, registry=r)
        self.model_name = model_name

    def request(self, endpoint: str) -> None:
        self._requests.labels(self.model_name, endpoint).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def set_load(self, load: LoadInfo, in_flight: int) -> None:
        m = self.model_name
        self._running.labels(m).set(load.num_running)
        self._waiting.labels(m).set(load.num_waiting)
        self._kv.labels(m).set(load.kv_usage)
        self._free.labels(m).set(load.free_pages)
        self._in_flight.labels(m).set(in_flight)
        x = load.transfer
        if x is not None:
            self._xfer.stats = x
            self._xfer_latency.labels(m).set(x.latency_sum_s / x.success if x.success else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request (created when it is sent)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.first_token_at: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        m, name = self.metrics, self.metrics.model_name
        if self.last is None:
            self.first_token_at = now
            m._ttft.labels(name).observe(now - self.start)
            n -= 1
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                m._itl.labels(name).observe(gap)
        self.last = now

    def finish(self, reason: str | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        m, name = self.metrics, self.metrics.model_name
        e2e = time.perf_counter() - self.start
        m._e2e.labels(name).observe(e2e)
        m._finished.labels(name, reason or "unknown").inc()
        m._prompt.labels(name).inc(prompt_tokens)
        m._gen.labels(name).inc(completion_tokens)
        m._cached.labels(name).inc(cached_tokens)
        return e2e
