"""`pdserve router`: flags (named after SGLang's router where one exists) → RouterConfig → serve.

Wire into the main CLI with `add_router_parser(subparsers)`; it sets `func=run_router`.
Also runnable as `python -m pdserve.router ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pdserve.router.config import (API_KEY_ENV, POLICIES, CircuitConfig, HealthConfig, LimitsConfig, PolicyConfig,
                                   RetryConfig, RouterConfig, WorkerSpec)


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    d, pol, ret, cb, hc, lim = RouterConfig(), PolicyConfig(), RetryConfig(), CircuitConfig(), HealthConfig(), \
        LimitsConfig()
    g = p.add_argument_group("workers")
    g.add_argument("--host", default=d.host, help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="unified workers (regular mode)")
    g.add_argument("--pd-disaggregation", action="store_true", help="PD mode: --prefill and --decode workers")
    g.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help="prefill worker and optional bootstrap port (repeatable); without a port it is read "
                        "from the worker's /server_info")
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="decode worker (repeatable)")
    g = p.add_argument_group("policy")
    g.add_argument("--policy", choices=POLICIES, default=pol.name)
    g.add_argument("--prefill-policy", choices=POLICIES, default=None, help="PD: policy for prefill (default --policy)")
    g.add_argument("--decode-policy", choices=POLICIES, default=None, help="PD: policy for decode (default --policy)")
    g.add_argument("--cache-threshold", type=float, default=pol.cache_threshold)
    g.add_argument("--balance-abs-threshold", type=int, default=pol.balance_abs_threshold)
    g.add_argument("--balance-rel-threshold", type=float, default=pol.balance_rel_threshold)
    g.add_argument("--eviction-interval-secs", type=float, default=pol.eviction_interval_s)
    g.add_argument("--max-tree-size", type=int, default=pol.max_tree_size)
    g = p.add_argument_group("limits")
    g.add_argument("--max-payload-size", type=int, default=lim.max_payload_bytes, help="bytes; larger bodies get 413")
    g.add_argument("--max-concurrent-requests", type=int, default=lim.max_concurrent, help="-1: no limit")
    g.add_argument("--queue-size", type=int, default=lim.queue_size, help="waiting requests beyond the limit (429 when full)")
    g.add_argument("--queue-timeout-secs", type=float, default=lim.queue_timeout_s, help="408 after waiting this long")
    g.add_argument("--request-timeout-secs", type=float, default=lim.request_timeout_s)
    g.add_argument("--worker-connect-timeout-secs", type=float, default=lim.connect_timeout_s)
    g = p.add_argument_group("retries and circuit breaker")
    g.add_argument("--migration-limit", type=int, default=3,
                   help="times a stream whose worker dies mid-way continues on another worker (0: never)")
    g.add_argument("--retry-max-retries", type=int, default=ret.max_attempts, help="total tries per request")
    g.add_argument("--retry-initial-backoff-ms", type=float, default=ret.initial_backoff_s * 1000)
    g.add_argument("--retry-max-backoff-ms", type=float, default=ret.max_backoff_s * 1000)
    g.add_argument("--retry-backoff-multiplier", type=float, default=ret.multiplier)
    g.add_argument("--retry-jitter-factor", type=float, default=ret.jitter)
    g.add_argument("--disable-retries", action="store_true")
    g.add_argument("--cb-failure-threshold", type=int, default=cb.failure_threshold)
    g.add_argument("--cb-success-threshold", type=int, default=cb.success_threshold)
    g.add_argument("--cb-timeout-duration-secs", type=float, default=cb.open_duration_s)
    g.add_argument("--disable-circuit-breaker", action="store_true")
    g = p.add_argument_group("health checks")
    g.add_argument("--health-check-interval-secs", type=float, default=hc.interval_s)
    g.add_argument("--health-check-timeout-secs", type=float, default=hc.timeout_s)
    g.add_argument("--health-failure-threshold", type=int, default=hc.failure_threshold)
    g.add_argument("--health-success-threshold", type=int, default=hc.success_threshold)
    g.add_argument("--health-check-endpoint", default=hc.endpoint)
    g.add_argument("--disable-health-check", action="store_true")
    g.add_argument("--load-check-interval-secs", type=float, default=hc.load_interval_s, help="/get_load polling")
    g = p.add_argument_group("security and logging")
    g.add_argument("--api-key", default=None, help=f"required on every route but /health, /liveness, /readiness, "
                                                   f"/metrics (also ${API_KEY_ENV})")
    g.add_argument("--worker-api-key", default=None, help="key sent to workers (default: --api-key)")
    g.add_argument("--request-id-headers", nargs="*", default=list(d.request_id_headers))
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    g.add_argument("--shutdown-grace-period-secs", type=float, default=d.shutdown_timeout_s)


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

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
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
        shutdown_timeout_s=args.shutdown_grace_period_secs, migration_limit=args.migration_limit)


def add_router_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `router` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("router", help="route requests over workers (regular or PD mode)",
                              description="Load-balance unified workers, or pair prefill and decode workers.")
    add_router_arguments(p)
    p.set_defaults(func=run_router)
    return p


def run_router(args: argparse.Namespace) -> int:
    import uvloop

    from pdserve.router.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        logging.getLogger("pdserve.router").error("%s", exc)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logging.getLogger("pdserve.router").warning("binding %s without --api-key: anyone who can reach it can "
                                                    "use it and change its workers", cfg.host)
    try:
        return uvloop.run(serve(cfg))
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
