"""`pdserve router`: flags (named after SGLang's router where one exists) → RouterConfig → serve.

Wire into the main CLI with `add_router_parser(subparsers)`; it sets `func=run_router`.
Also runnable as `python -m pdserve.router ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from pdserve.contract import API_KEY_ENV, SERVER_INFO_PATH, resolve_api_key
from pdserve.discovery import parse_discovery_url
from pdserve.flags.argtypes import OneLineParser, metrics_prefix, non_negative_float, non_negative_int, port_number, \
    positive_float, positive_int, unit_interval
from pdserve.flags.cors import CORS_FLAGS
from pdserve.flags.table import Flag, add_flags, flag_values, with_values
from pdserve.router.config import POLICIES, RouterConfig, WorkerSpec

MS = 0.001  # a flag in milliseconds over a field in seconds
ROUTER_FLAGS: dict[str, tuple[Flag, ...]] = {  # argument group -> its flags, over RouterConfig's fields
    "workers": (
        Flag(("--host",), "host", str, "bind address"),
        Flag(("--port",), "port", port_number, "HTTP port"),
        Flag(("--worker-urls",), None, str, "unified workers (regular mode)", nargs="*", metavar="URL",
             shown="none; add them later with POST /workers or POST /add_worker?url=URL"),
        Flag(("--pd-disaggregation",), "pd", None, "PD mode: --prefill and --decode workers"),
        Flag(("--prefill",), None, str, "prefill worker and optional bootstrap port (repeatable); without a port "
             f"it is read from the worker's {SERVER_INFO_PATH}", nargs="+", repeat=True,
             metavar=("URL", "BOOTSTRAP_PORT")),
        Flag(("--decode",), None, str, "decode worker (repeatable)", repeat=True, metavar="URL"),
        Flag(("--discovery",), None, str, "also follow the workers registered in etcd by `pdserve serve --discovery` "
             "(prefill and decode in PD mode, unified otherwise); they join and leave as they come and go",
             metavar="etcd://HOST:PORT[/PREFIX]", shown="off"),
    ),
    "policy": (
        Flag(("--policy",), "policy.name", str, "worker selection", POLICIES),
        Flag(("--prefill-policy",), None, str, "PD: policy for prefill", POLICIES, shown="--policy"),
        Flag(("--decode-policy",), None, str, "PD: policy for decode", POLICIES, shown="--policy"),
        Flag(("--cache-threshold",), "policy.cache_threshold", unit_interval,
             "cache_aware: prefix match ratio above which the best-matching worker is used"),
        Flag(("--balance-abs-threshold",), "policy.balance_abs_threshold", non_negative_int,
             "cache_aware: load gap (requests) above which it balances instead"),
        Flag(("--balance-rel-threshold",), "policy.balance_rel_threshold", positive_float,
             "cache_aware: load ratio above which it balances instead"),
        Flag(("--eviction-interval-secs",), "policy.eviction_interval_s", positive_float,
             "cache_aware: seconds between prefix-tree evictions"),
        Flag(("--max-tree-size",), "policy.max_tree_size", positive_int,
             "cache_aware: prefix-tree size per worker before eviction"),
    ),
    "limits": (
        Flag(("--max-payload-size",), "limits.max_payload_bytes", positive_int, "bytes; larger bodies get 413"),
        Flag(("--max-concurrent-requests",), "limits.max_concurrent", int,
             "requests forwarded at once; -1: no limit"),
        Flag(("--queue-size",), "limits.queue_size", non_negative_int,
             "waiting requests beyond the limit, 429 when full"),
        Flag(("--queue-timeout-secs",), "limits.queue_timeout_s", positive_float, "408 after waiting this long"),
        Flag(("--request-timeout-secs",), "limits.request_timeout_s", positive_float,
             "seconds a forwarded request may take"),
        Flag(("--worker-connect-timeout-secs",), "limits.connect_timeout_s", positive_float,
             "seconds to connect to a worker"),
    ),
    "retries and circuit breaker": (
        Flag(("--migration-limit",), "migration_limit", non_negative_int,
             "times a stream whose worker dies mid-way continues on another worker (0: never)"),
        Flag(("--pd-local-prefill-threshold",), "pd_local_prefill_threshold", non_negative_int,
             "PD: send a request to the decode alone (local prefill) when its prompt tokens not in that "
             "decode's prefix cache (exact, from KV events) are at most this", metavar="TOKENS", shown="off"),
        Flag(("--pd-prefill-queue-limit",), "pd_prefill_queue_limit", non_negative_int,
             "PD: send a request to the decode alone when every prefill has more than this many requests "
             "queued or running", metavar="REQUESTS", shown="off"),
        Flag(("--disable-kv-events",), "kv_events", None,
             "do not subscribe to workers' KV events (cache_aware then uses only its approximate tree)", const=False),
        Flag(("--retry-max-retries",), "retry.max_attempts", positive_int, "total tries per request"),
        Flag(("--retry-initial-backoff-ms",), "retry.initial_backoff_s", non_negative_float,
             "first backoff before a retry", unit=MS),
        Flag(("--retry-max-backoff-ms",), "retry.max_backoff_s", non_negative_float, "backoff cap", unit=MS),
        Flag(("--retry-backoff-multiplier",), "retry.multiplier", positive_float, "backoff growth per retry, >= 1"),
        Flag(("--retry-jitter-factor",), "retry.jitter", unit_interval,
             "+/- fraction of random jitter on each backoff"),
        Flag(("--disable-retries",), "retry.max_attempts", None, "one try per request", const=1),
        Flag(("--cb-failure-threshold",), "circuit.failure_threshold", positive_int,
             "consecutive failures that open a worker's circuit"),
        Flag(("--cb-success-threshold",), "circuit.success_threshold", positive_int,
             "half-open successes that close it again"),
        Flag(("--cb-timeout-duration-secs",), "circuit.open_duration_s", positive_float,
             "seconds a circuit stays open before a half-open try"),
        Flag(("--disable-circuit-breaker",), "circuit.enabled", None, "never take a worker out for failures",
             const=False),
    ),
    "health checks": (
        Flag(("--health-check-interval-secs",), "health.interval_s", positive_float,
             "seconds between health checks of each worker"),
        Flag(("--health-check-timeout-secs",), "health.timeout_s", positive_float, "seconds a health check may take"),
        Flag(("--health-failure-threshold",), "health.failure_threshold", positive_int,
             "failed checks that mark a worker unhealthy"),
        Flag(("--health-success-threshold",), "health.success_threshold", positive_int,
             "passed checks that mark it healthy again"),
        Flag(("--health-check-endpoint",), "health.endpoint", str, "path checked on each worker"),
        Flag(("--disable-health-check",), "health.enabled", None, "treat every worker as healthy", const=False),
        Flag(("--load-check-interval-secs",), "health.load_interval_s", positive_float,
             "seconds between /get_load polls of each worker"),
    ),
    "admission control and tracing": (
        Flag(("--admission-control",), "admission.enabled", None,
             "refuse (503 + Retry-After) requests no worker can serve in time, from the workers' polled /get_load "
             "(thresholds below, a request's ttft_deadline_ms); GET/POST /admission changes them at runtime"),
        Flag(("--admission-max-kv-usage",), "admission.max_kv_usage", unit_interval,
             "refuse when every decode (regular: worker) holds more than this fraction of its KV pool"),
        Flag(("--admission-max-queue-wait",), "admission.max_queue_wait_s", positive_float,
             "refuse when every prefill (regular: worker) predicts a longer queue (seconds)", shown="no limit"),
        Flag(("--admission-retry-after",), "admission.retry_after_s", non_negative_float,
             "the smallest Retry-After (seconds) a refusal carries"),
        Flag(("--enable-trace",), "enable_trace", None,
             "OpenTelemetry spans: the router's and its pick; the legs carry their W3C traceparent (pdserve[trace])"),
        Flag(("--otlp-traces-endpoint",), "otlp_traces_endpoint", str,
             "http://HOST:PORT[/path]: OTLP over HTTP/protobuf; HOST:PORT: OTLP over gRPC"),
    ),
    "security and logging": (
        Flag(("--api-key",), None, str, "required on every route but /health, /liveness, /readiness, /metrics",
             shown=f"${API_KEY_ENV}, else none"),
        Flag(("--worker-api-key",), "worker_api_key", str, "key sent to workers", shown="--api-key"),
        Flag(("--request-id-headers",), "request_id_headers", str, "headers read as the request id", nargs="*",
             metavar="HEADER"),
        Flag(("--log-level",), "log_level", str, "", ("debug", "info", "warning", "error")),
        Flag(("--metrics-prefix",), "metrics_prefix", metrics_prefix,
             "metric names are PREFIX_router_NAME (sglang-router's: sgl_router_requests_total, ...)"),
        Flag(("--prometheus-port",), "prometheus_port", port_number,
             "also serve /metrics on this port (sglang-router's flag)", shown="off: /metrics on --port only"),
        Flag(("--prometheus-host",), "prometheus_host", str, "address the --prometheus-port listener binds"),
        Flag(("--shutdown-grace-period-secs",), "shutdown_timeout_s", non_negative_float,
             "seconds in-flight requests get to finish on SIGTERM"),
    ),
}
ROUTER_FLAGS["CORS (vLLM's flags)"] = CORS_FLAGS
ALL_FLAGS = tuple(f for group in ROUTER_FLAGS.values() for f in group)


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    for title, flags in ROUTER_FLAGS.items():
        add_flags(p.add_argument_group(title), flags, RouterConfig())


def _prefill_spec(items: list[str]) -> WorkerSpec:
    if len(items) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(items)}")
    port: int | None = None
    if len(items) == 2 and items[1].lower() != "none":
        try:
            port = int(items[1])
        except ValueError:
            raise ValueError(f"--prefill {items[0]}: bootstrap port {items[1]!r} is not a number") from None
    return WorkerSpec(items[0], "prefill", port)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    workers = [WorkerSpec(u, "regular") for u in args.worker_urls or ()]
    workers += [_prefill_spec(items) for items in args.prefill or ()]
    workers += [WorkerSpec(u, "decode") for u in args.decode or ()]
    cfg = with_values(RouterConfig(), {**flag_values(args, ALL_FLAGS, RouterConfig()), "workers": tuple(workers),
                                       "api_key": resolve_api_key(args.api_key),
                                       "discovery": parse_discovery_url(args.discovery) if args.discovery else None})
    per_role = {f"{role}_policy": dataclasses.replace(cfg.policy, name=name)
                for role, name in (("prefill", args.prefill_policy), ("decode", args.decode_policy)) if name}
    return with_values(cfg, per_role)


def add_router_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `router` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("router", help="route requests over workers (regular or PD mode)",
                              description="Load-balance unified workers, or pair prefill and decode workers.")
    add_router_arguments(p)
    p.set_defaults(func=run_router)
    return p


def run_router(args: argparse.Namespace) -> int:
    """Start-up checks first (flags, the port): a problem is one line on stderr and exit code 2."""
    from pdserve.router.server import bind_socket, serve

    try:
        cfg = config_from_args(args)
        if cfg.enable_trace:
            from pdserve.tracing import exporter_for

            exporter_for(cfg.otlp_traces_endpoint).shutdown()
        sock = bind_socket(cfg.host, cfg.port)
    except (ValueError, OSError, ImportError) as exc:
        print(f"pdserve router: error: {exc}", file=sys.stderr)
        return 2
    import uvloop

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logging.getLogger("pdserve.router").warning("binding %s without --api-key: anyone who can reach it can "
                                                    "use it and change its workers", cfg.host)
    try:
        return uvloop.run(serve(cfg, sock))
    except OSError as exc:
        logging.getLogger("pdserve.router").error("%s", exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "router":
        argv = argv[1:]
    parser = OneLineParser(prog="pdserve router", description="Route requests over pdserve workers.")
    add_router_arguments(parser)
    return run_router(parser.parse_args(argv))
