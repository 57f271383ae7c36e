"""`pdserve router`: flags (named after SGLang's router where one exists) → RouterConfig → serve.

Wire into the main CLI with `add_router_parser(subparsers)`; it sets `func=run_router`.
Also runnable as `python -m pdserve.router ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pdserve.launch.argtypes import metrics_prefix, non_negative_float, non_negative_int, port_number, positive_float, \
    positive_int, unit_interval
from pdserve.contract import API_KEY_ENV, resolve_api_key
from pdserve.router.config import (POLICIES, CircuitConfig, HealthConfig, LimitsConfig, PolicyConfig,
                                   RetryConfig, RouterConfig, WorkerSpec)


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    d, pol, ret, cb, hc, lim = RouterConfig(), PolicyConfig(), RetryConfig(), CircuitConfig(), HealthConfig(), \
        LimitsConfig()
    g = p.add_argument_group("workers")
    g.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    g.add_argument("--port", type=port_number, default=d.port, help=f"HTTP port (default {d.port})")
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                   help="unified workers (regular mode) (default: none; add them later with POST /add_worker)")
    g.add_argument("--pd-disaggregation", action="store_true", help="PD mode: --prefill and --decode workers")
    g.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help="prefill worker and optional bootstrap port (repeatable); without a port it is read "
                        "from the worker's /server_info")
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="decode worker (repeatable)")
    g = p.add_argument_group("policy")
    g.add_argument("--policy", choices=POLICIES, default=pol.name, help=f"worker selection (default {pol.name})")
    g.add_argument("--prefill-policy", choices=POLICIES, default=None, help="PD: policy for prefill (default --policy)")
    g.add_argument("--decode-policy", choices=POLICIES, default=None, help="PD: policy for decode (default --policy)")
    g.add_argument("--cache-threshold", type=unit_interval, default=pol.cache_threshold,
                   help=f"cache_aware: prefix match ratio above which the best-matching worker is used "
                        f"(default {pol.cache_threshold})")
    g.add_argument("--balance-abs-threshold", type=non_negative_int, default=pol.balance_abs_threshold,
                   help=f"cache_aware: load gap (requests) above which it balances instead "
                        f"(default {pol.balance_abs_threshold})")
    g.add_argument("--balance-rel-threshold", type=positive_float, default=pol.balance_rel_threshold,
                   help=f"cache_aware: load ratio above which it balances instead (default {pol.balance_rel_threshold})")
    g.add_argument("--eviction-interval-secs", type=positive_float, default=pol.eviction_interval_s,
                   help=f"cache_aware: seconds between prefix-tree evictions (default {pol.eviction_interval_s:g})")
    g.add_argument("--max-tree-size", type=positive_int, default=pol.max_tree_size,
                   help=f"cache_aware: prefix-tree size per worker before eviction (default {pol.max_tree_size})")
    g = p.add_argument_group("limits")
    g.add_argument("--max-payload-size", type=positive_int, default=lim.max_payload_bytes,
                   help=f"bytes; larger bodies get 413 (default {lim.max_payload_bytes})")
    g.add_argument("--max-concurrent-requests", type=int, default=lim.max_concurrent,
                   help=f"requests forwarded at once; -1: no limit (default {lim.max_concurrent})")
    g.add_argument("--queue-size", type=non_negative_int, default=lim.queue_size,
                   help=f"waiting requests beyond the limit, 429 when full (default {lim.queue_size})")
    g.add_argument("--queue-timeout-secs", type=positive_float, default=lim.queue_timeout_s,
                   help=f"408 after waiting this long (default {lim.queue_timeout_s:g})")
    g.add_argument("--request-timeout-secs", type=positive_float, default=lim.request_timeout_s,
                   help=f"seconds a forwarded request may take (default {lim.request_timeout_s:g})")
    g.add_argument("--worker-connect-timeout-secs", type=positive_float, default=lim.connect_timeout_s,
                   help=f"seconds to connect to a worker (default {lim.connect_timeout_s:g})")
    g = p.add_argument_group("retries and circuit breaker")
    g.add_argument("--migration-limit", type=non_negative_int, default=3,
                   help="times a stream whose worker dies mid-way continues on another worker (0: never) "
                        "(default 3)")
    g.add_argument("--pd-local-prefill-threshold", type=non_negative_int, default=None, metavar="TOKENS",
                   help="PD: send a request to the decode alone (local prefill) when its prompt tokens not in "
                        "that decode's prefix cache (exact, from KV events) are at most this (default: off)")
    g.add_argument("--pd-prefill-queue-limit", type=non_negative_int, default=None, metavar="REQUESTS",
                   help="PD: send a request to the decode alone when every prefill has more than this many "
                        "requests queued or running (default: off)")
    g.add_argument("--disable-kv-events", action="store_true",
                   help="do not subscribe to workers' KV events (cache_aware then uses only its approximate tree)")
    g.add_argument("--retry-max-retries", type=positive_int, default=ret.max_attempts,
                   help=f"total tries per request (default {ret.max_attempts})")
    g.add_argument("--retry-initial-backoff-ms", type=non_negative_float, default=ret.initial_backoff_s * 1000,
                   help=f"first backoff before a retry (default {ret.initial_backoff_s * 1000:g})")
    g.add_argument("--retry-max-backoff-ms", type=non_negative_float, default=ret.max_backoff_s * 1000,
                   help=f"backoff cap (default {ret.max_backoff_s * 1000:g})")
    g.add_argument("--retry-backoff-multiplier", type=positive_float, default=ret.multiplier,
                   help=f"backoff growth per retry, >= 1 (default {ret.multiplier})")
    g.add_argument("--retry-jitter-factor", type=unit_interval, default=ret.jitter,
                   help=f"+/- fraction of random jitter on each backoff (default {ret.jitter})")
    g.add_argument("--disable-retries", action="store_true", help="one try per request")
    g.add_argument("--cb-failure-threshold", type=positive_int, default=cb.failure_threshold,
                   help=f"consecutive failures that open a worker's circuit (default {cb.failure_threshold})")
    g.add_argument("--cb-success-threshold", type=positive_int, default=cb.success_threshold,
                   help=f"half-open successes that close it again (default {cb.success_threshold})")
    g.add_argument("--cb-timeout-duration-secs", type=positive_float, default=cb.open_duration_s,
                   help=f"seconds a circuit stays open before a half-open try (default {cb.open_duration_s:g})")
    g.add_argument("--disable-circuit-breaker", action="store_true", help="never take a worker out for failures")
    g = p.add_argument_group("health checks")
    g.add_argument("--health-check-interval-secs", type=positive_float, default=hc.interval_s,
                   help=f"seconds between health checks of each worker (default {hc.interval_s:g})")
    g.add_argument("--health-check-timeout-secs", type=positive_float, default=hc.timeout_s,
                   help=f"seconds a health check may take (default {hc.timeout_s:g})")
    g.add_argument("--health-failure-threshold", type=positive_int, default=hc.failure_threshold,
                   help=f"failed checks that mark a worker unhealthy (default {hc.failure_threshold})")
    g.add_argument("--health-success-threshold", type=positive_int, default=hc.success_threshold,
                   help=f"passed checks that mark it healthy again (default {hc.success_threshold})")
    g.add_argument("--health-check-endpoint", default=hc.endpoint,
                   help=f"path checked on each worker (default {hc.endpoint})")
    g.add_argument("--disable-health-check", action="store_true", help="treat every worker as healthy")
    g.add_argument("--load-check-interval-secs", type=positive_float, default=hc.load_interval_s,
                   help=f"seconds between /get_load polls of each worker (default {hc.load_interval_s:g})")
    g = p.add_argument_group("security and logging")
    g.add_argument("--api-key", default=None, help=f"required on every route but /health, /liveness, /readiness, "
                                                   f"/metrics (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--worker-api-key", default=None, help="key sent to workers (default: --api-key)")
    g.add_argument("--request-id-headers", nargs="*", default=list(d.request_id_headers), metavar="HEADER",
                   help=f"headers read as the request id (default {' '.join(d.request_id_headers)})")
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"],
                   help=f"(default {d.log_level})")
    g.add_argument("--metrics-prefix", type=metrics_prefix, default=d.metrics_prefix,
                   help=f"/metrics names are PREFIX:router_name, like the servers' (default {d.metrics_prefix})")
    g.add_argument("--shutdown-grace-period-secs", type=non_negative_float, default=d.shutdown_timeout_s,
                   help=f"seconds in-flight requests get to finish on SIGTERM (default {d.shutdown_timeout_s:g})")


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
    workers: list[WorkerSpec] = [WorkerSpec(u, "regular") for u in args.worker_urls]
    if args.pd_disaggregation:
        workers += [_prefill_spec(items) for items in args.prefill]
        workers += [WorkerSpec(u, "decode") for u in args.decode]
    elif args.prefill or args.decode:
        raise ValueError("--prefill/--decode need --pd-disaggregation")

    def policy(name: str) -> PolicyConfig:
        return PolicyConfig(name, args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold,
                            args.eviction_interval_secs, args.max_tree_size)

    api_key = resolve_api_key(args.api_key)
    return RouterConfig(
        host=args.host, port=args.port, pd=args.pd_disaggregation, workers=tuple(workers),
        policy=policy(args.policy),
        prefill_policy=policy(args.prefill_policy) if args.prefill_policy else None,
        decode_policy=policy(args.decode_policy) if args.decode_policy else None,
        retry=RetryConfig(1 if args.disable_retries else args.retry_max_retries, args.retry_initial_backoff_ms / 1000,
                          args.retry_max_backoff_ms / 1000, args.retry_backoff_multiplier, args.retry_jitter_factor),
        circuit=CircuitConfig(not args.disable_circuit_breaker, args.cb_failure_threshold, args.cb_success_threshold,
                              args.cb_timeout_duration_secs),
        health=HealthConfig(not args.disable_health_check, args.health_check_interval_secs,
                            args.health_check_timeout_secs, args.health_failure_threshold,
                            args.health_success_threshold, args.health_check_endpoint, args.load_check_interval_secs),
        limits=LimitsConfig(args.max_concurrent_requests, args.queue_size, args.queue_timeout_secs,
                            args.max_payload_size, args.request_timeout_secs, args.worker_connect_timeout_secs),
        api_key=api_key, worker_api_key=args.worker_api_key,
        request_id_headers=tuple(h.lower() for h in args.request_id_headers), log_level=args.log_level,
        shutdown_timeout_s=args.shutdown_grace_period_secs, metrics_prefix=args.metrics_prefix,
        migration_limit=args.migration_limit, pd_local_prefill_threshold=args.pd_local_prefill_threshold,
        pd_prefill_queue_limit=args.pd_prefill_queue_limit, kv_events=not args.disable_kv_events)


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
        sock = bind_socket(cfg.host, cfg.port)
    except (ValueError, OSError) as exc:
        print(f"pdserve router: error: {exc}", file=sys.stderr)
        return 2
    import uvloop

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    parser = argparse.ArgumentParser(prog="pdserve router", description="Route requests over pdserve workers.")
    add_router_arguments(parser)
    return run_router(parser.parse_args(argv))
