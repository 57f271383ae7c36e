"""`pdserve serve`: CLI flags → start-up checks → ServerConfig → the HTTP server.

Lifecycle of `run_serve(args)`:
  1. check what can be checked before any process spawns (`preflight`): the model path, the
     flag combinations, and the port, which is bound right away so a taken port fails in a
     second, not after the model loads; any problem is one line on stderr and exit code 2;
  2. build the frozen ServerConfig (flags; API key also from contract.API_KEY_ENV);
  3. `http_server.serve_app`: uvicorn's start-up spawns the engine process and waits for it,
     then logs the one "ready" line; it stops cleanly on SIGTERM/SIGINT.
This module imports neither torch nor uvicorn: `pdserve --help` builds its parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any

from pdserve.contract import API_KEY_ENV, DEFAULT_BOOTSTRAP_PORT, resolve_api_key
from pdserve.disagg.backends import BACKENDS
from pdserve.disagg.config import TOKEN_ENV, DisaggConfig
from pdserve.engine.args import add_engine_arguments, check_engine_args, engine_config_from_args
from pdserve.launch.argtypes import metrics_prefix, port_number, positive_float, positive_int
from pdserve.launch.sockets import bind_socket
from pdserve.server.config import ServerConfig

logger = logging.getLogger("pdserve.server")
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    d = ServerConfig()
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    g.add_argument("--port", type=port_number, default=d.port, help=f"HTTP port (default {d.port})")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                        f"(default: ${API_KEY_ENV}, else none)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) requests may use; the first is shown by /v1/models, others answer 404 "
                        "(default: 'default' or the model folder's name)")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults: 'auto' (the model's generation_config.json), 'none', or a folder "
                        "(default auto)")
    g.add_argument("--max-body-mb", type=positive_float, default=d.max_body_bytes / 2**20,
                   help=f"request body cap in MiB; larger bodies get 413 (default {d.max_body_bytes / 2**20:g})")
    g.add_argument("--max-n", type=positive_int, default=d.max_n, help=f"cap on n (default {d.max_n})")
    g.add_argument("--max-prompts", type=positive_int, default=d.max_prompts,
                   help=f"cap on prompts per request (default {d.max_prompts})")
    g.add_argument("--max-tokens-cap", type=positive_int, default=None,
                   help="cap on max_tokens (default: the context length)")
    g.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help='reads the model\'s own tool calls for tool_choice "auto" (hermes: Qwen/Hermes '
                        '<tool_call>) (default: none; "auto" is then refused)')
    g.add_argument("--engine-start-timeout", type=positive_float, default=d.engine_start_timeout_s,
                   help=f"seconds the engine may take to load (default {d.engine_start_timeout_s:g})")
    g.add_argument("--shutdown-timeout", type=positive_float, default=d.shutdown_timeout_s,
                   help=f"seconds per shutdown stage (default {d.shutdown_timeout_s:g})")
    g = p.add_argument_group("PD disaggregation (knobs: PDSERVE_DISAGGREGATION_* env, see README)")
    g.add_argument("--disaggregation-mode", default="null", choices=["null", "prefill", "decode"],
                   help="null: a unified server; prefill or decode: one side of a PD pair (default null)")
    g.add_argument("--disaggregation-transfer-backend", default="tcp", choices=list(BACKENDS),
                   help="how KV pages move between prefill and decode (default tcp)")
    g.add_argument("--disaggregation-bootstrap-port", type=port_number, default=DEFAULT_BOOTSTRAP_PORT,
                   help=f"bootstrap server port on a prefill server (default {DEFAULT_BOOTSTRAP_PORT})")
    g.add_argument("--disaggregation-bootstrap-host", default=None,
                   help="address the bootstrap server and transfer endpoint bind (default: --host)")
    g.add_argument("--disaggregation-ib-device", default=None,
                   help="RDMA device(s) for the mooncake backend's rdma protocol, e.g. mlx5_0 "
                        "(default: $PDSERVE_DISAGGREGATION_IB_DEVICE, else none)")
    g.add_argument("--disaggregation-failure-policy", default=None, choices=["recompute", "error"],
                   help="decode, when a KV transfer fails (prefill dead, timeout, rejected record): run "
                        "the prompt itself (recompute) or answer a clean 503 (error) (default recompute)")
    g.add_argument("--disaggregation-decode-enable-radix-cache", action="store_true",
                   help="decode: keep finished requests' pages in the radix cache and match each PD "
                        "prompt against it first; only the pages past the hit move (default off)")
    g = p.add_argument_group("logging and metrics")
    g.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS, help=f"(default {d.log_level})")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)")
    g.add_argument("--log-requests", action="store_true",
                   help="log one line per finished request (tokens, queue time, TTFT, E2E)")
    g.add_argument("--metrics-prefix", type=metrics_prefix, default=d.metrics_prefix,
                   help=f"/metrics names are PREFIX:name with SGLang's names, so SGLang's dashboards work "
                        f"(default {d.metrics_prefix})")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("serve", help="run an OpenAI-compatible HTTP server over one engine",
                              description="Serve a model over HTTP (OpenAI + SGLang-native API).")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    api_key = resolve_api_key(args.api_key)
    # the bootstrap server and transfer sessions need a secret: the cluster token, else the API key
    disagg = DisaggConfig.from_env(
        cluster_token=os.environ.get(TOKEN_ENV) or api_key, mode=args.disaggregation_mode, backend=args.disaggregation_transfer_backend,
        bootstrap_port=args.disaggregation_bootstrap_port,
        bootstrap_host=args.disaggregation_bootstrap_host or args.host, ib_device=args.disaggregation_ib_device,
        failure_policy=args.disaggregation_failure_policy,
        decode_enable_radix_cache=args.disaggregation_decode_enable_radix_cache or None)
    return ServerConfig(
        engine=engine_config_from_args(args), disagg=disagg, host=args.host, port=args.port, api_key=api_key,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        served_model_aliases=tuple(args.served_model_name[1:]) if args.served_model_name else (),
        generation_config=args.generation_config, max_body_bytes=int(args.max_body_mb * 2**20),
        max_n=args.max_n, max_prompts=args.max_prompts, max_tokens_cap=args.max_tokens_cap,
        engine_start_timeout_s=args.engine_start_timeout, shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level, access_log=args.access_log, log_requests=args.log_requests,
        metrics_prefix=args.metrics_prefix, tool_call_parser=args.tool_call_parser)


def preflight(args: argparse.Namespace) -> tuple[ServerConfig, socket.socket]:
    """Start-up checks before any process spawns; raises ValueError / OSError with one line.
    Returns the config and the bound (not yet listening) socket."""
    from pdserve.model.bundled import check_model

    check_model(args.model)
    if args.tokenizer:
        check_model(args.tokenizer)
    check_engine_args(args)
    if args.disaggregation_mode == "prefill" and args.disaggregation_bootstrap_port == args.port:
        raise ValueError(f"--disaggregation-bootstrap-port {args.port} is the HTTP --port too; pick another")
    if args.disaggregation_decode_enable_radix_cache and args.disaggregation_mode != "decode":
        raise ValueError("--disaggregation-decode-enable-radix-cache is for --disaggregation-mode decode only")
    if args.disaggregation_decode_enable_radix_cache and args.disable_prefix_cache:
        raise ValueError("--disaggregation-decode-enable-radix-cache needs the radix cache: "
                         "drop --disable-radix-cache")
    config = config_from_args(args)
    sock = bind_socket(config.host, config.port)
    if config.disagg.mode == "prefill":
        try:  # the bootstrap server binds it later, in the engine process: fail now, not after the load
            bind_socket(config.disagg.bootstrap_host or config.host, config.disagg.bootstrap_port).close()
        except OSError:
            sock.close()
            raise
    return config, sock


def run_serve(args: argparse.Namespace) -> int:
    try:
        config, sock = preflight(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PDSERVE_LOG_LEVEL", config.log_level)
    if config.engine.node_rank > 0:  # only tensor-parallel ranks here: node 0 serves HTTP
        from pdserve.engine.tp_worker import serve_node

        sock.close()
        return serve_node(config.engine, config.disagg)  # PD: each rank transfers its own KV heads
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach it can use it", config.host)
    from pdserve.server.http_server import serve_app

    try:
        return serve_app(config, sock)
    finally:
        sock.close()
