"""KV tiers in /get_load (`kv_tiers`) and /metrics (engine/kv_tiers; --enable-hierarchical-cache).

Metrics, `<prefix>:` + name, labels model_name and `tier` (device | host | storage):
  hicache_hit_tokens_total{tier}     admitted prompt tokens whose KV came from that tier
  hicache_pages_total{tier,op}       pages read from / written to host and storage (op read | write)
  hicache_bytes_total{tier,op}       the same in bytes
  hicache_tier_pages{tier,state}     gauge: pages of each tier, used and total
  hicache_load_seconds_total, hicache_loads_total          host -> device load-back batches
  hicache_prefetch_seconds_total, hicache_prefetches_total  storage lookups + fetches
  hicache_storage_up                 gauge: 0 while the store does not answer (reads are misses)
  hicache_storage_outages_total, hicache_storage_write_failures_total,
  hicache_storage_bad_pages_total, hicache_storage_misses_total
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.engine.messages import LoadInfo, TierLoad


def tier_figures(t: TierLoad, load: LoadInfo) -> dict[str, Any]:
    """`/get_load`'s `kv_tiers`: each tier's use and what moved."""
    return {
        "device": {"pages": load.num_pages, "used": load.num_pages - load.free_pages, "free": load.free_pages},
        "host": {"pages": t.host_pages, "used": t.host_used, "free": t.host_pages - t.host_used,
                 "pages_read": t.host_pages_read, "pages_written": t.host_pages_written},
        "storage": {"backend": t.storage_backend, "up": t.storage_up, "pages_read": t.storage_pages_read,
                    "bytes_read": t.storage_bytes_read, "pages_written": t.storage_pages_written,
                    "bytes_written": t.storage_bytes_written, "write_failures": t.storage_write_failures,
                    "misses": t.storage_misses, "bad_pages": t.storage_bad_pages, "outages": t.storage_outages},
        "hit_tokens": dict(t.hit_tokens),
        "page_bytes": t.page_bytes,
        "load_back": {"count": t.loads, "seconds": t.load_seconds},
        "prefetch": {"count": t.prefetches, "seconds": t.prefetch_seconds},
    }


def tier_metrics(prefix: str, model: str, t: TierLoad, load: LoadInfo) -> Iterator[Metric]:
    def family(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str,
               labels: tuple[str, ...], rows: list[tuple[tuple[str, ...], float]]) -> Metric:
        m = kind(f"{prefix}:{name}", doc, labels=["model_name", *labels])
        for values, value in rows:
            m.add_metric([model, *values], value)
        return m

    yield family(CounterMetricFamily, "hicache_hit_tokens", "Admitted prompt tokens whose KV came from each tier",
                 ("tier",), [((k,), v) for k, v in sorted(t.hit_tokens.items())])
    pb = t.page_bytes
    yield family(CounterMetricFamily, "hicache_pages", "KV pages read from / written to each lower tier",
                 ("tier", "op"), [(("host", "read"), t.host_pages_read), (("host", "write"), t.host_pages_written),
                                  (("storage", "read"), t.storage_pages_read),
                                  (("storage", "write"), t.storage_pages_written)])
    yield family(CounterMetricFamily, "hicache_bytes", "KV bytes read from / written to each lower tier",
                 ("tier", "op"), [(("host", "read"), t.host_pages_read * pb),
                                  (("host", "write"), t.host_pages_written * pb),
                                  (("storage", "read"), t.storage_bytes_read),
                                  (("storage", "write"), t.storage_bytes_written)])
    yield family(GaugeMetricFamily, "hicache_tier_pages", "Pages of each tier", ("tier", "state"),
                 [(("device", "used"), load.num_pages - load.free_pages), (("device", "total"), load.num_pages),
                  (("host", "used"), t.host_used), (("host", "total"), t.host_pages)])
    for name, doc, value in (
            ("hicache_load_seconds", "Time of host -> device load-back batches", t.load_seconds),
            ("hicache_loads", "Host -> device load-back batches", t.loads),
            ("hicache_prefetch_seconds", "Time of storage prefetches (lookup + fetch)", t.prefetch_seconds),
            ("hicache_prefetches", "Storage prefetches", t.prefetches),
            ("hicache_storage_outages", "Times the storage backend stopped answering", t.storage_outages),
            ("hicache_storage_write_failures", "Pages not written: store full or down, queue full",
             t.storage_write_failures),
            ("hicache_storage_bad_pages", "Stored pages refused (corrupt, truncated, another layout)",
             t.storage_bad_pages),
            ("hicache_storage_misses", "Storage lookups and reads that ended on a missing page", t.storage_misses)):
        yield family(CounterMetricFamily, name, doc, (), [((), value)])
    yield family(GaugeMetricFamily, "hicache_storage_up", "1 while the storage backend answers (0: down, or none)",
                 (), [((), float(t.storage_backend is not None and t.storage_up))])
