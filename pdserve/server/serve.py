"""`pdserve serve`: CLI flags → ServerConfig → uvicorn (uvloop) serving the app.

Lifecycle of `run_serve(args)`:
  1. build the frozen ServerConfig (flags; API key also from $PDSERVE_API_KEY);
  2. bind the listening socket first, so a taken port fails in a second, not after the model
     loads (uvicorn starts listening on it only once the engine is ready);
  3. run uvicorn: the app's lifespan spawns the engine process and waits for it;
  4. on SIGTERM/SIGINT: stop accepting, abort in-flight requests (streams end with
     finish_reason "abort"), wait (bounded) for connections to close, then the lifespan stops
     the engine process; a second SIGINT forces the exit. Returns 0 after a clean stop, 1 if
     the engine process died (the server then stops by itself).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

from pdserve.launch.sockets import bind_socket
from pdserve.engine.args import add_engine_arguments, engine_config_from_args
from pdserve.disagg.backends import BACKENDS
from pdserve.disagg.config import DisaggConfig
from pdserve.server.app import begin_shutdown, build_app
from pdserve.server.config import API_KEY_ENV, ServerConfig

logger = logging.getLogger("pdserve.server")



def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (also ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="model name shown by /v1/models")
    d = ServerConfig()
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body cap (MiB)")
    p.add_argument("--max-n", type=int, default=d.max_n, help="cap on n")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="cap on prompts per request")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="cap on max_tokens (default: context length)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help='reads the model\'s own tool calls for tool_choice "auto" (hermes: Qwen/Hermes <tool_call>)')
    p.add_argument("--engine-start-timeout", type=float, default=d.engine_start_timeout_s, help="seconds")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s, help="seconds per stage")
    g = p.add_argument_group("PD disaggregation (knobs: PDSERVE_DISAGGREGATION_* env, see README)")
    g.add_argument("--disaggregation-mode", default="null", choices=["null", "prefill", "decode"])
    g.add_argument("--disaggregation-transfer-backend", default="tcp",
                   choices=list(BACKENDS))
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=8998,
                   help="bootstrap server port on a prefill server")
    g.add_argument("--disaggregation-bootstrap-host", default=None,
                   help="address the bootstrap server and transfer endpoint bind (default: --host)")
    g.add_argument("--disaggregation-ib-device", default=None,
                   help="RDMA device(s) for the mooncake backend's rdma protocol, e.g. mlx5_0 "
                        "(env PDSERVE_DISAGGREGATION_IB_DEVICE)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("serve", help="run an OpenAI-compatible HTTP server over one engine",
                              description="Serve a model over HTTP (OpenAI + SGLang-native API).")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    disagg = DisaggConfig.from_env(
        mode=args.disaggregation_mode, backend=args.disaggregation_transfer_backend,
        bootstrap_port=args.disaggregation_bootstrap_port,
        bootstrap_host=args.disaggregation_bootstrap_host or args.host, ib_device=args.disaggregation_ib_device)
    return ServerConfig(
        engine=engine_config_from_args(args), disagg=disagg, host=args.host, port=args.port, api_key=api_key,
        served_model_name=args.served_model_name, max_body_bytes=int(args.max_body_mb * 2**20),
        max_n=args.max_n, max_prompts=args.max_prompts, max_tokens_cap=args.max_tokens_cap,
        engine_start_timeout_s=args.engine_start_timeout, shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level, access_log=args.access_log, tool_call_parser=args.tool_call_parser)


class _Server(uvicorn.Server):
    """uvicorn.Server that aborts in-flight work on the first signal and exits normally."""

    def __init__(self, config: uvicorn.Config, on_exit: Any) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("received %s: shutting down", signal.Signals(sig).name)
            try:
                self._on_exit()
            except Exception:  # never let a signal handler raise
                logger.exception("shutdown hook failed")
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # like uvicorn's, but without re-raising the signal afterwards: we stopped cleanly
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PDSERVE_LOG_LEVEL", config.log_level)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach it can use it", config.host)
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    app = build_app(config)
    uv_config = uvicorn.Config(app, loop="uvloop", log_level=config.log_level, access_log=config.access_log,
                               timeout_graceful_shutdown=int(max(1, config.shutdown_timeout_s)),
                               timeout_keep_alive=5, lifespan="on")
    server = _Server(uv_config, on_exit=lambda: _schedule_shutdown(app))
    app.fastapi.state.request_exit = lambda: setattr(server, "should_exit", True)
    logger.info("pdserve serving on http://%s:%d (model %s)", config.host, config.port, config.engine.model)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        logger.error("server failed to start")
        return 1
    client = app.fastapi.state.client
    if client is not None and client.dead_reason is not None:
        logger.error("exiting because the engine process died: %s", client.dead_reason)
        return 1
    return 0


def _schedule_shutdown(app: Any) -> None:
    import asyncio

    fastapi_app = app.fastapi
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        loop.call_soon_threadsafe(begin_shutdown, fastapi_app)
    else:
        begin_shutdown(fastapi_app)

