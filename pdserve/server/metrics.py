"""Prometheus metrics of one server, with SGLang's names (own registry per app).

Names are `<prefix>:<name>` with SGLang's names and types (prefix `--metrics-prefix`, default
`sglang`, so SGLang's Grafana dashboard and deploy/grafana/pdserve.json read them); where
SGLang has no metric, vLLM's name is used under the same prefix. Label: `model_name`.

  front, per request (`RequestTimer`): counters num_requests_total, prompt_tokens_total,
    generation_tokens_total, cached_tokens_total, num_aborted_requests_total,
    request_success_total{finished_reason}, request_errors_total{status},
    admission_rejected_total{reason} (server/admission.py); histograms
    time_to_first_token_seconds, inter_token_latency_seconds, time_per_output_token_seconds
    (per request, SGLang's: (E2E - TTFT) / (output tokens - 1)), e2e_request_latency_seconds,
    queue_time_seconds, request_prefill_time_seconds, request_decode_time_seconds,
    prompt_tokens_histogram, generation_tokens_histogram;
  engine, read from /get_load data at each scrape (`EngineCollector`): gauges
    num_running_reqs, num_queue_reqs, num_used_tokens and token_usage (SGLang's meaning: slots
    held by requests; cached pages no request holds are evictable, so free), num_cached_tokens,
    max_total_num_tokens,
    gen_throughput, cache_hit_rate, num_in_flight_reqs; counters (the engine's cumulative
    counts) num_retracted_requests_total (preemptions), prefix_cache_queries_total,
    prefix_cache_hits_total, prefill_compute_tokens_total; PD: kv_transfers_total{result},
    kv_transfer_bytes_total, num_transfer_failed_reqs_total, kv_transfer_seconds_total,
    kv_transfer_recomputed_total, gauges kv_transfer_latency_ms and
    kv_transfer_speed_gb_s (means over successful transfers); speculative decoding (label
    proposer on counters): gauges spec_accept_length (mean tokens per verify: accepted drafts +
    the target's own), spec_accept_rate, spec_num_draft_tokens, counters spec_verify_calls_total,
    spec_decode_num_draft_tokens_total and spec_decode_num_accepted_tokens_total (vLLM's names),
    spec_adaptive_skipped_total, histogram spec_accept_length_histogram (tokens per verify). KV tiers:
    server/tier_metrics.py.
With `--log-requests`, `RequestTimer.finish` also logs one line per finished request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.engine.messages import LoadInfo, SpecStats, TokenOut
from pdserve.server.tier_metrics import tier_metrics

disable_created_metrics()  # no `*_created` series: they double the scrape for no use here
log = logging.getLogger("pdserve.server.requests")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                    2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_QUEUE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000, 32000)


class EngineCollector(Collector):
    """The engine's figures from the last /get_load, as gauges and (cumulative) counters."""

    def __init__(self, prefix: str, model_name: str) -> None:
        self.p = prefix
        self.model_name = model_name
        self.load: LoadInfo | None = None
        self.ranks: list[LoadInfo] = []  # each dp rank's (one entry without --dp-size)
        self.in_flight = 0

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"{self.p}:{name}", doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float, extra: tuple[str, str] | None = None) -> CounterMetricFamily:
        c = CounterMetricFamily(f"{self.p}:{name}", doc, labels=["model_name", *([extra[0]] if extra else [])])
        c.add_metric([self.model_name, *([extra[1]] if extra else [])], value)
        return c

    def collect(self) -> Iterator[Metric]:
        load = self.load
        if load is None:
            return
        used = (load.num_pages - load.free_pages - load.evictable_pages) * load.page_size
        yield self._gauge("num_running_reqs", "Requests in the running batch", load.num_running)
        yield self._gauge("num_queue_reqs", "Requests waiting for admission (PD queues included)", load.num_waiting)
        yield self._gauge("num_used_tokens", "KV slots held by requests (SGLang's: evictable cached slots are free)",
                          used)
        yield self._gauge("token_usage", "Fraction of KV slots held by requests (evictable cached ones count as "
                          "free, as in SGLang)", load.kv_usage)
        yield self._gauge("num_cached_tokens", "KV slots in the prefix cache (held or evictable)",
                          load.cached_pages * load.page_size)
        yield self._gauge("max_total_num_tokens", "KV pool size in tokens", load.num_pages * load.page_size)
        yield self._gauge("gen_throughput", "Generation throughput over the last stats window (tokens/s)",
                          load.gen_throughput)
        yield self._gauge("cache_hit_rate", "Prefix-cache hit rate over the last stats window", load.cache_hit_rate)
        yield self._gauge("num_in_flight_reqs", "Engine requests the HTTP front is waiting on", self.in_flight)
        yield self._counter("num_retracted_requests", "Preemptions (requests sent back to recompute)",
                            load.num_preemptions)
        yield self._counter("prefix_cache_queries", "Prompt tokens of finished requests", load.cache_queries)
        yield self._counter("prefix_cache_hits", "Of those, tokens served from the prefix cache", load.cache_hits)
        yield self._counter("prefill_compute_tokens", "Prompt tokens computed (recomputation included)",
                            load.prompt_tokens_computed)
        yield from self._per_rank()
        if load.tiers is not None:
            yield from tier_metrics(self.p, self.model_name, load.tiers, load)
        if load.spec is not None:
            yield from self._spec(load.spec)
        yield from self._experts()
        x = load.transfer
        if x is None:
            return
        transfers = CounterMetricFamily(f"{self.p}:kv_transfers", "PD KV transfers ended, by result",
                                        labels=["model_name", "result"])
        transfers.add_metric([self.model_name, "success"], x.success)
        transfers.add_metric([self.model_name, "failed"], x.failed)
        yield transfers
        yield self._counter("kv_transfer_bytes", "KV bytes moved by successful PD transfers", x.bytes)
        yield self._counter("num_transfer_failed_reqs", "PD requests whose KV transfer failed", x.failed)
        yield self._counter("kv_transfer_seconds", "Sum of room start -> transfer success times", x.latency_sum_s)
        yield self._counter("kv_transfer_recomputed", "Failed transfers the decode recomputed (policy recompute)",
                            x.recomputed)
        mean_s = x.latency_sum_s / x.success if x.success else 0.0
        yield self._gauge("kv_transfer_latency_ms", "Mean time from room start to transfer success (ms)",
                          mean_s * 1000.0)
        speed = x.bytes / x.latency_sum_s / 1e9 if x.latency_sum_s > 0 else 0.0
        yield self._gauge("kv_transfer_speed_gb_s", "Mean KV transfer speed of successful rooms (GB/s)", speed)

    def _spec(self, s: SpecStats) -> Iterator[Metric]:
        """Speculative decoding: SGLang's spec_* gauges (means since start), counters per proposer."""
        label = ("proposer", s.proposer)
        yield self._gauge("spec_accept_length", "Mean tokens per verify (accepted drafts + the target's own)",
                          (s.accepted_tokens + s.verify_calls) / s.verify_calls if s.verify_calls else 0.0)
        yield self._gauge("spec_accept_rate", "Accepted drafts / drafts verified",
                          s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0)
        yield self._gauge("spec_num_draft_tokens", "Most drafts per request and step", s.num_draft_tokens)
        yield self._counter("spec_verify_calls", "Chunks verified with drafts", s.verify_calls, label)
        yield self._counter("spec_decode_num_draft_tokens", "Drafts verified", s.draft_tokens, label)
        yield self._counter("spec_decode_num_accepted_tokens", "Drafts accepted", s.accepted_tokens, label)
        yield self._counter("spec_adaptive_skipped", "Decode steps with a proposal the adaptive rule did not verify",
                            s.skipped, label)
        h = HistogramMetricFamily(f"{self.p}:spec_accept_length_histogram", "Tokens per verify (accepted drafts + 1)",
                                  labels=["model_name", "proposer"])
        cumulative = [sum(s.accept_lengths[:n]) for n in range(1, len(s.accept_lengths) + 1)]
        h.add_metric([self.model_name, s.proposer], [(str(n), c) for n, c in enumerate(cumulative, start=1)]
                     + [("+Inf", s.verify_calls)], sum(n * c for n, c in enumerate(s.accept_lengths, start=1)))
        yield h

    def _experts(self) -> Iterator[Metric]:
        """A mixture-of-experts model's routing: pairs per expert (all sparse layers) and per EP rank,
        and the EP ranks' imbalance (busiest over mean: what an expert rebalance would lower)."""
        moe = self.load.experts if self.load is not None else None
        if moe is None:
            return
        for name, doc, label, values in (
                ("moe_expert_routed_tokens", "Tokens routed to each expert, summed over sparse layers", "expert",
                 moe.experts),
                ("moe_ep_rank_routed_tokens", "Tokens routed to each expert-parallel rank's experts", "ep_rank",
                 moe.ep_ranks)):
            m = CounterMetricFamily(f"{self.p}:{name}", doc, labels=["model_name", label])
            for i, v in enumerate(values):
                m.add_metric([self.model_name, str(i)], v)
            yield m
        mean = sum(moe.ep_ranks) / len(moe.ep_ranks)
        yield self._gauge("moe_ep_imbalance", "Busiest expert-parallel rank's routed tokens over the mean (1: even)",
                          max(moe.ep_ranks) / mean if mean else 1.0)

    def _per_rank(self) -> Iterator[Metric]:
        """Each data-parallel rank's queue and steps (label dp_rank)."""
        def family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str,
                   value: Callable[[LoadInfo], float]) -> Metric:
            m = kind(f"{self.p}:{name}", doc, labels=["model_name", "dp_rank"])
            for x in self.ranks:
                m.add_metric([self.model_name, str(x.dp_rank)], value(x))
            return m

        yield family(GaugeMetricFamily, "dp_num_running_reqs", "Running requests of each dp rank",
                     lambda x: x.num_running)
        yield family(GaugeMetricFamily, "dp_num_queue_reqs", "Waiting requests of each dp rank",
                     lambda x: x.num_waiting)
        yield family(CounterMetricFamily, "dp_steps", "Forwards each dp rank ran", lambda x: x.steps)
        yield family(CounterMetricFamily, "dp_step_seconds", "Their total time (DP attention: waiting for the "
                     "other ranks included)", lambda x: x.step_seconds)
        yield family(CounterMetricFamily, "dp_idle_steps", "DP attention: forwards a rank ran with no tokens of "
                     "its own (the other ranks' collectives)", lambda x: x.idle_steps)


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = "sglang", log_requests: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.log_requests = log_requests
        labels = ["model_name"]
        r, p = self.registry, prefix

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(f"{p}:{name}", doc, labels + (extra or []), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{p}:{name}", doc, labels, buckets=buckets, registry=r)

        self._requests = counter("num_requests", "Generation requests received (HTTP)", ["endpoint"])
        self._finished = counter("request_success", "Engine requests finished, by reason", ["finished_reason"])
        self._aborted = counter("num_aborted_requests", "Engine requests aborted")
        self._errors = counter("request_errors", "Generation requests rejected or failed", ["status"])
        self._prompt = counter("prompt_tokens", "Prompt tokens of finished requests")
        self._gen = counter("generation_tokens", "Tokens generated")
        self._cached = counter("cached_tokens", "Prompt tokens served from the prefix cache")
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Time between output tokens", _LATENCY_BUCKETS)
        self._tpot = histogram("time_per_output_token_seconds", "Per request: (E2E - TTFT) / (output tokens - 1), "
                               "SGLang's", _LATENCY_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency", _E2E_BUCKETS)
        self._queue = histogram("queue_time_seconds", "Engine arrival to first forward", _QUEUE_BUCKETS)
        self._prefill = histogram("request_prefill_time_seconds", "First forward to first token", _E2E_BUCKETS)
        self._decode = histogram("request_decode_time_seconds", "First token to finish", _E2E_BUCKETS)
        self._prompt_hist = histogram("prompt_tokens_histogram", "Prompt tokens per request", _TOKEN_BUCKETS)
        self._gen_hist = histogram("generation_tokens_histogram", "Generated tokens per request", _TOKEN_BUCKETS)
        self._admission = counter("admission_rejected", "Requests refused by admission control (503)", ["reason"])
        self.engine = EngineCollector(prefix, model_name)
        r.register(self.engine)

    def request(self, endpoint: str) -> None:
        self._requests.labels(self.model_name, endpoint).inc()

    def admission_rejected(self, reason: str) -> None:
        self._admission.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def set_load(self, load: LoadInfo, in_flight: int, ranks: list[LoadInfo] | None = None) -> None:
        self.engine.load, self.engine.in_flight = load, in_flight
        self.engine.ranks = ranks if ranks is not None else [load]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request (created when it is sent)."""

    def __init__(self, metrics: ServerMetrics, rid: str = "") -> None:
        self.metrics = metrics
        self.rid = rid
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

    def finish(self, out: TokenOut, prompt_tokens: int, completion_tokens: int) -> float:
        """Record the finished request (`out` is the engine's last TokenOut); returns E2E seconds."""
        m, name = self.metrics, self.metrics.model_name
        e2e = time.perf_counter() - self.start
        reason = out.finish_reason or "unknown"
        m._e2e.labels(name).observe(e2e)
        m._finished.labels(name, reason).inc()
        if reason == "abort":
            m._aborted.labels(name).inc()
        m._prompt.labels(name).inc(prompt_tokens)
        m._gen.labels(name).inc(completion_tokens)
        m._cached.labels(name).inc(out.cached_tokens)
        if reason != "abort":  # an abort's phases are cut short: they would skew the histograms
            m._queue.labels(name).observe(out.queue_time_s)
            m._prefill.labels(name).observe(out.prefill_time_s)
            m._decode.labels(name).observe(out.decode_time_s)
        m._prompt_hist.labels(name).observe(prompt_tokens)
        m._gen_hist.labels(name).observe(completion_tokens)
        if reason != "abort" and self.first_token_at is not None and completion_tokens > 1:
            m._tpot.labels(name).observe((self.start + e2e - self.first_token_at) / (completion_tokens - 1))
        if m.log_requests:
            ttft = f"{self.first_token_at - self.start:.3f}" if self.first_token_at is not None else "-"
            log.info("request %s finished (%s): prompt %d tokens (%d cached), output %d tokens, queue %.3f s, "
                     "ttft %s s, e2e %.3f s", self.rid, reason, prompt_tokens, out.cached_tokens, completion_tokens,
                     out.queue_time_s, ttft, e2e)
        return e2e
