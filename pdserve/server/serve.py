"""`pdserve serve`: CLI flags → start-up checks → ServerConfig → the HTTP server.

Lifecycle of `run_serve(args)`:
  1. check what can be checked before any process spawns (`preflight`): the model path (a Hub
     id is fetched into the Hugging Face cache here), the flag combinations (a peer's flag
     with no effect here is a warning), and the port, which is bound right away so a taken port fails in a
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

from pdserve.contract import API_KEY_ENV, resolve_api_key
from pdserve.disagg.backends import BACKENDS, missing_extra
from pdserve.disagg.config import DECODE_RADIX_FLAG, ENV_PREFIX, FAILURE_POLICIES, MODES, TOKEN_ENV, DisaggConfig
from pdserve.discovery import DEFAULT_TTL_S, MIN_TTL_S, DiscoveryConfig, parse_discovery_url
from pdserve.engine.args import ENGINE_EXTRAS, add_engine_arguments, check_engine_args, engine_config_from_args
from pdserve.flags.argtypes import fraction, metrics_prefix, non_negative_int, port_number, positive_float, \
    positive_int
from pdserve.flags.cors import CORS_FLAGS
from pdserve.flags.sockets import bind_socket
from pdserve.flags.table import Flag, add_flags, flag_values, noop_warnings, with_values
from pdserve.model.hub import TOKEN_ENV as HF_TOKEN_ENV
from pdserve.server.config import ServerConfig
from pdserve.server.tool_parsers import PARSERS

logger = logging.getLogger("pdserve.server")
LOG_LEVELS = ("debug", "info", "warning", "error")

HTTP_FLAGS: tuple[Flag, ...] = (
    Flag(("--host",), "host", str, "bind address"),
    Flag(("--port",), "port", port_number, "HTTP port"),
    Flag(("--api-key",), None, str, "require 'Authorization: Bearer KEY' on every route but /health and /metrics",
         shown=f"${API_KEY_ENV}, else none"),
    Flag(("--served-model-name",), None, str, "model name(s) requests may use; the first is shown by /v1/models, "
         "others answer 404", nargs="+", shown="'default' or the model folder's name"),
    Flag(("--generation-config",), "generation_config", str,
         "sampling defaults: 'auto' (the model's generation_config.json), 'none', or a folder"),
    Flag(("--max-body-mb",), "max_body_bytes", positive_float, "request body cap in MiB; larger bodies get 413",
         unit=2**20),
    Flag(("--max-n",), "max_n", positive_int, "cap on n"),
    Flag(("--max-prompts",), "max_prompts", positive_int, "cap on prompts per request"),
    Flag(("--max-tokens-cap",), "max_tokens_cap", positive_int, "cap on max_tokens", shown="the context length"),
    Flag(("--tool-call-parser",), "tool_call_parser", str, "reads the model's own tool calls for tool_choice "
         "\"auto\" (hermes / SGLang's qwen25: Qwen/Hermes <tool_call>; llama3_json / SGLang's llama3)",
         tuple(PARSERS), shown="chosen from the model's family"),
    Flag(("--enable-auto-tool-choice",), None, None, "accepted (vLLM's)",
         noop='tool_choice "auto" is always on (the parser: --tool-call-parser, else the model family\'s)'),
    Flag(("--responses-kept",), "responses_kept", non_negative_int,
         "/v1/responses answers kept for previous_response_id and GET /v1/responses/{id} (oldest dropped first)"),
    Flag(("--engine-start-timeout",), "engine_start_timeout_s", positive_float, "seconds the engine may take to load"),
    Flag(("--shutdown-timeout",), "shutdown_timeout_s", positive_float, "seconds per shutdown stage"),
)
# fields of ServerConfig.disagg: a flag given overrides the environment knob (DisaggConfig.from_env)
PD_FLAGS: tuple[Flag, ...] = (
    Flag(("--disaggregation-mode",), "disagg.mode", str,
         "null: a unified server; prefill or decode: one side of a PD pair", MODES),
    Flag(("--disaggregation-transfer-backend",), "disagg.backend", str,
         "how KV pages move between prefill and decode", tuple(BACKENDS)),
    Flag(("--disaggregation-bootstrap-port",), "disagg.bootstrap_port", port_number,
         "bootstrap server port on a prefill server"),
    Flag(("--disaggregation-bootstrap-host",), "disagg.bootstrap_host", str,
         "address the bootstrap server and transfer endpoint bind", shown="--host"),
    Flag(("--disaggregation-ib-device",), "disagg.ib_device", str,
         "RDMA device(s) for the mooncake backend's rdma protocol, e.g. mlx5_0",
         shown=f"${ENV_PREFIX}IB_DEVICE, else none"),
    Flag(("--disaggregation-failure-policy",), "disagg.failure_policy", str,
         "decode, when a KV transfer fails (prefill dead, timeout, rejected record): run the prompt itself "
         "(recompute) or answer a clean 503 (error)", FAILURE_POLICIES),
    Flag((DECODE_RADIX_FLAG,), "disagg.decode_enable_radix_cache", None,
         "decode: keep finished requests' pages in the radix cache and match each PD prompt against it first; "
         "only the pages past the hit move", shown="off"),
)
LOG_FLAGS: tuple[Flag, ...] = (
    Flag(("--log-level",), "log_level", str, "", LOG_LEVELS),
    Flag(("--access-log",), "access_log", None, "log every HTTP request (uvicorn's access log)"),
    Flag(("--log-requests",), "log_requests", None,
         "log one line per finished request (tokens, queue time, TTFT, E2E)"),
    Flag(("--metrics-prefix",), "metrics_prefix", metrics_prefix,
         "/metrics names are PREFIX:name with SGLang's names, so SGLang's dashboards work"),
)
ADMISSION_FLAGS: tuple[Flag, ...] = (
    Flag(("--admission-control",), "admission.enabled", None,
         "refuse (503 + Retry-After) requests this server cannot serve in time (thresholds below; a request's "
         "ttft_deadline_ms too); GET/POST /admission reads and changes them at runtime"),
    Flag(("--admission-max-kv-usage",), "admission.max_kv_usage", fraction,
         "refuse while requests hold more than this fraction of the KV pool"),
    Flag(("--admission-max-queued-tokens",), "admission.max_queued_tokens", positive_int,
         "refuse when more prompt tokens than this would wait for their first token", shown="no limit"),
    Flag(("--admission-max-queue-wait",), "admission.max_queue_wait_s", positive_float,
         "refuse when the queue ahead is predicted to take longer than this (seconds, from measured step times)",
         shown="no limit"),
    Flag(("--admission-retry-after",), "admission.retry_after_s", positive_float,
         "the smallest Retry-After (seconds) a refusal carries"),
)
TRACE_FLAGS: tuple[Flag, ...] = (
    Flag(("--enable-trace",), "enable_trace", None,
         "OpenTelemetry spans per request (queue, prefill forward, KV transfer, decode), parented by the "
         "request's W3C traceparent (needs pdserve[trace])"),
    Flag(("--otlp-traces-endpoint",), "otlp_traces_endpoint", str,
         "where spans go: http://HOST:PORT[/path] exports OTLP over HTTP/protobuf, HOST:PORT over gRPC"),
)
DISCOVERY_FLAGS: tuple[Flag, ...] = (
    Flag(("--discovery",), None, str, "register this server in etcd once ready (role, URL, bootstrap port, model, "
         "...), under a lease it keeps alive; routers given the same --discovery find it",
         metavar="etcd://HOST:PORT[/PREFIX]", shown="off"),
    Flag(("--discovery-ttl",), None, int, f"lease TTL: a server that dies leaves the routers this long after "
         f"(>= {MIN_TTL_S})", metavar="SECONDS", shown=str(DEFAULT_TTL_S)),
    Flag(("--discovery-advertise-host",), "advertise_host", str, "the host routers reach this server at",
         metavar="HOST", shown="--host, or this machine's name when --host is a wildcard"),
)
SERVE_FLAGS = HTTP_FLAGS + PD_FLAGS + DISCOVERY_FLAGS + LOG_FLAGS + ADMISSION_FLAGS + TRACE_FLAGS + CORS_FLAGS


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    d = ServerConfig()
    add_flags(p.add_argument_group("HTTP server"), HTTP_FLAGS, d)
    add_flags(p.add_argument_group("PD disaggregation (knobs: PDSERVE_DISAGGREGATION_* env, see README)"), PD_FLAGS, d)
    add_flags(p.add_argument_group("discovery"), DISCOVERY_FLAGS, d)
    add_flags(p.add_argument_group("logging and metrics"), LOG_FLAGS, d)
    add_flags(p.add_argument_group("admission control"), ADMISSION_FLAGS, d)
    add_flags(p.add_argument_group("tracing"), TRACE_FLAGS, d)
    add_flags(p.add_argument_group("CORS (vLLM's flags)"), CORS_FLAGS, d)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("serve", help="run an OpenAI-compatible HTTP server over one engine",
                              description="Serve a model over HTTP (OpenAI + SGLang-native API).")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = flag_values(args, SERVE_FLAGS, ServerConfig())
    api_key = resolve_api_key(args.api_key)
    pd = {k.removeprefix("disagg."): values.pop(k) for k in [k for k in values if k.startswith("disagg.")]}
    pd.setdefault("bootstrap_host", values.get("host", ServerConfig.host))  # default: --host
    names = args.served_model_name or [None]
    # the bootstrap server and transfer sessions need a secret: the cluster token, else the API key
    disagg = DisaggConfig.from_env(cluster_token=os.environ.get(TOKEN_ENV) or api_key, **pd)
    return with_values(ServerConfig(), {**values, "engine": engine_config_from_args(args), "disagg": disagg,
                                        "api_key": api_key, "served_model_name": names[0],
                                        "served_model_aliases": tuple(names[1:]),
                                        "discovery": _discovery(args)})


def _discovery(args: argparse.Namespace) -> DiscoveryConfig | None:
    if not args.discovery:
        return None
    return parse_discovery_url(args.discovery, DEFAULT_TTL_S if args.discovery_ttl is None else args.discovery_ttl)


def preflight(args: argparse.Namespace) -> tuple[ServerConfig, socket.socket]:
    """Start-up checks before any process spawns; raises ValueError / OSError with one line.
    Returns the config and the bound (not yet listening) socket."""
    from pdserve.model.bundled import check_model
    from pdserve.model.config import check_architecture

    check_engine_args(args)
    config = config_from_args(args)
    if args.hf_token:
        os.environ[HF_TOKEN_ENV] = args.hf_token  # huggingface_hub's, here and in the engine process
    for line in noop_warnings(args, SERVE_FLAGS + ENGINE_EXTRAS):
        print(f"pdserve serve: warning: {line}", file=sys.stderr)
    engine = config.engine
    check_architecture(check_model(engine.model, engine.revision, engine.download_dir))
    if engine.tokenizer:
        check_model(engine.tokenizer, download_dir=engine.download_dir, weights=False)
    pd = config.disagg
    if pd.mode != "null" and (missing := missing_extra(pd.backend)) is not None:
        raise ValueError(missing)
    if pd.mode == "prefill" and pd.bootstrap_port == config.port:
        raise ValueError(f"--disaggregation-bootstrap-port {config.port} is the HTTP --port too; pick another")
    pd.check_decode_radix_cache(config.engine.enable_prefix_cache)
    config.admission.check()
    if config.enable_trace:
        check_tracing(config.otlp_traces_endpoint)
    sock = bind_socket(config.host, config.port)
    if pd.mode == "prefill":
        try:  # the bootstrap server binds it later, in the engine process: fail now, not after the load
            bind_socket(pd.bootstrap_host or config.host, pd.bootstrap_port).close()
        except OSError:
            sock.close()
            raise
    return config, sock


def check_tracing(endpoint: str) -> None:
    """--enable-trace: the SDK is installed and the endpoint parses (ValueError with one line)."""
    from pdserve.tracing import exporter_for

    try:
        exporter_for(endpoint).shutdown()
    except ImportError as exc:
        raise ValueError(f"--enable-trace needs OpenTelemetry (pip install 'pdserve[trace]'): {exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    try:
        config, sock = preflight(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PDSERVE_LOG_LEVEL", config.log_level)
    if config.engine.parallel.node_rank > 0:  # only tensor-parallel ranks here: node 0 serves HTTP
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
