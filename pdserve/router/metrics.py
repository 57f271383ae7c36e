"""Prometheus metrics of the router (a private registry per router instance).

Named like sglang-router's (`<prefix>_router_<name>`, prefix `--metrics-prefix`, default `sgl`:
`sgl_router_requests_total`, so its dashboards read them), served at `/metrics` and on
`--prometheus-port` (sglang-router's flag); no `_created` series. sglang-router's names:
`requests_total{route,status}`, `request_duration_seconds{route}`,
`request_errors_total{route,error_type}` (answers >= 400, by status), `retries_total{route}`,
`active_workers`, per worker `worker_health`, `worker_load` (its polled /get_load),
`running_requests` (in flight from this router), `processed_requests_total`, `cb_state`
(circuit: 0 closed / 1 half-open / 2 open). pdserve's own: `rejected_total{reason}` (the
limiter), `active_requests` / `queued_requests`, `worker_requests_total{worker,outcome}`; PD:
`pd_ttft_seconds` (request start → first decode byte), `pd_decisions_total{decision}`
(conditional disaggregation: remote, local_threshold, local_queue), `kv_index_resyncs_total
{worker}` (KV-event index snapshots), `pd_transfer_failures_total{leg,reason}` (worker-side
failures: connection errors, 5xx, 408/429), `pd_client_errors_total{leg,status}` (a leg's 4xx
about the client's own request: not a transfer failure), `migrations_total{outcome}`;
discovery: `discovery_changes_total{kind}` (records added / updated / removed in etcd) and
`discovery_connected` (1 while the etcd watch is up); per finished generation (router/usage.py;
what `pdserve planner` reads) `generations_total`, `prompt_tokens_total`, `output_tokens_total`
(token events of streams), `ttft_seconds` and `itl_seconds` (streams: first token event; mean
gap between events).

Labels with a known, closed set of values (decisions, migration outcomes, limiter reasons)
start at 0, so a dashboard's query has data before the first event. Per-worker gauges are
rebuilt from the registry at each scrape, so removed workers disappear. Label children are
cached: a request costs a few dict lookups, not label parsing.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pdserve.router.resilience import STATE_CODES
from pdserve.router.usage import Usage

DECISIONS = ("remote", "local_threshold", "local_queue")

disable_created_metrics()
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)


class _Processed(Collector):
    """`processed_requests_total{worker}`: each worker's count, read from the registry at scrape time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workers: list[Any] = []

    def collect(self) -> Any:
        c = CounterMetricFamily(self.name, "Requests each worker finished (attempts included)", labels=["worker"])
        for w in self.workers:
            c.add_metric([w.url], w.processed)
        yield c


class RouterMetrics:
    def __init__(self, prefix: str = "sgl") -> None:
        P = f"{prefix}_router_"
        r = self.registry = CollectorRegistry()
        self.requests = Counter(P + "requests_total", "Requests answered", ["route", "status"], registry=r)
        self.errors = Counter(P + "request_errors_total", "Requests answered with an error, by status",
                              ["route", "error_type"], registry=r)
        self.duration = Histogram(P + "request_duration_seconds", "Request time in the router", ["route"],
                                  buckets=_BUCKETS, registry=r)
        self.retries = Counter(P + "retries_total", "Retries on another worker or pair", ["route"], registry=r)
        self.rejected = Counter(P + "rejected_total", "Requests refused by the limiter", ["reason"], registry=r)
        self.worker_requests = Counter(P + "worker_requests_total", "Upstream attempts", ["worker", "outcome"],
                                       registry=r)
        self.pd_ttft = Histogram(P + "pd_ttft_seconds", "PD: request start to first decode byte",
                                 buckets=_BUCKETS, registry=r)
        self.pd_failures = Counter(P + "pd_transfer_failures_total", "PD: failed legs", ["leg", "reason"],
                                   registry=r)
        self.pd_client_errors = Counter(P + "pd_client_errors_total", "PD: legs answered with a client error (4xx)",
                                        ["leg", "status"], registry=r)
        self.pd_decisions = Counter(P + "pd_decisions_total",
                                    "PD: per attempt, remote prefill or the decode alone (local_threshold, local_queue)",
                                    ["decision"], registry=r)
        self.kv_resyncs = Counter(P + "kv_index_resyncs_total", "KV index snapshots taken (connects and seq gaps)",
                                  ["worker"], registry=r)
        self.migrations = Counter(P + "migrations_total", "Streams moved to another worker mid-way, by outcome",
                                  ["outcome"], registry=r)
        self.discovery_changes = Counter(P + "discovery_changes_total", "Worker records seen in etcd, by kind",
                                         ["kind"], registry=r)
        self.discovery_connected = Gauge(P + "discovery_connected", "1 while the etcd watch is up (--discovery)",
                                         registry=r)
        self.generations = Counter(P + "generations_total", "Generation requests answered 200", registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens_total", "Prompt tokens of answered generations", registry=r)
        self.output_tokens = Counter(P + "output_tokens_total", "Output tokens (stream token events) of answered "
                                     "generations", registry=r)
        self.ttft = Histogram(P + "ttft_seconds", "Streams: request start to the first token event", buckets=_BUCKETS,
                              registry=r)
        self.itl = Histogram(P + "itl_seconds", "Streams: mean gap between token events, one per request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.active = Gauge(P + "active_requests", "Requests holding a concurrency slot", registry=r)
        self.queued = Gauge(P + "queued_requests", "Requests waiting for a slot", registry=r)
        self.active_workers = Gauge(P + "active_workers", "Workers healthy now", registry=r)
        self.w_in_flight = Gauge(P + "running_requests", "Requests in flight per worker", ["worker", "role"],
                                 registry=r)
        self.w_load = Gauge(P + "worker_load", "Last /get_load of each worker", ["worker", "role"], registry=r)
        self.w_healthy = Gauge(P + "worker_health", "1 if healthy", ["worker", "role"], registry=r)
        self.w_circuit = Gauge(P + "cb_state", "Circuit: 0 closed, 1 half-open, 2 open", ["worker", "role"],
                               registry=r)
        self.processed = _Processed(P + "processed_requests")
        r.register(self.processed)
        for decision in DECISIONS:
            self.pd_decisions.labels(decision)
        for outcome in ("ok", "failed"):
            self.migrations.labels(outcome)
        for reason in ("queue_full", "queue_timeout"):
            self.rejected.labels(reason)
        self._req: dict[tuple[str, int], Any] = {}
        self._dur: dict[str, Any] = {}
        self._retry: dict[str, Any] = {}
        self._wreq: dict[tuple[str, str], Any] = {}
        self._dec: dict[str, Any] = {}

    def request_done(self, route: str, status: int, seconds: float) -> None:
        c = self._req.get((route, status))
        if c is None:
            c = self._req[(route, status)] = self.requests.labels(route, str(status))
        c.inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        h = self._dur.get(route)
        if h is None:
            h = self._dur[route] = self.duration.labels(route)
        h.observe(seconds)

    def generation(self, usage: Usage) -> None:
        self.generations.inc()
        if usage.prompt_tokens:
            self.prompt_tokens.inc(usage.prompt_tokens)
        if usage.output_tokens:
            self.output_tokens.inc(usage.output_tokens)
        if usage.ttft_s is not None:
            self.ttft.observe(usage.ttft_s)
        if usage.itl_s is not None:
            self.itl.observe(usage.itl_s)

    def retry(self, route: str) -> None:
        c = self._retry.get(route)
        if c is None:
            c = self._retry[route] = self.retries.labels(route)
        c.inc()

    def worker_outcome(self, url: str, outcome: str) -> None:
        c = self._wreq.get((url, outcome))
        if c is None:
            c = self._wreq[(url, outcome)] = self.worker_requests.labels(url, outcome)
        c.inc()

    def pd_decision(self, decision: str) -> None:
        c = self._dec.get(decision)
        if c is None:
            c = self._dec[decision] = self.pd_decisions.labels(decision)
        c.inc()

    def discovery_change(self, kind: str) -> None:
        self.discovery_changes.labels(kind).inc()

    def pd_failure(self, leg: str, reason: str) -> None:
        self.pd_failures.labels(leg, reason).inc()

    def pd_answer(self, leg: str, status: int) -> None:
        """A leg answered with an error status: the client's own error, or a failure of the leg."""
        if status < 500 and status not in (408, 429):
            self.pd_client_errors.labels(leg, str(status)).inc()
        else:
            self.pd_failures.labels(leg, str(status)).inc()

    def render(self, workers: list[Any], active: int, queued: int, discovery_connected: bool | None = None) -> bytes:
        if discovery_connected is not None:
            self.discovery_connected.set(1 if discovery_connected else 0)
        self.active.set(active)
        self.queued.set(queued)
        for g in (self.w_in_flight, self.w_load, self.w_healthy, self.w_circuit):
            g.clear()
        self.processed.workers = workers
        self.active_workers.set(sum(1 for w in workers if w.healthy))
        for w in workers:
            self.w_in_flight.labels(w.url, w.role).set(w.in_flight)
            self.w_load.labels(w.url, w.role).set(w.load)
            self.w_healthy.labels(w.url, w.role).set(1 if w.healthy else 0)
            self.w_circuit.labels(w.url, w.role).set(STATE_CODES[w.breaker.state])
        return generate_latest(self.registry)
