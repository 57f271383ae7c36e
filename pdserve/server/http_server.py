"""uvicorn (uvloop) serving one pdserve app on a pre-bound socket, with a clean signal stop.

Lifecycle of `serve_app(config, sock)`:
  1. build the app; uvicorn's start-up runs its lifespan, which spawns the engine process and
     waits for it (the engine logs its loading progress meanwhile);
  2. once uvicorn serves the socket (so /health answers 200), log the one "ready" line with
     the URL; nothing before it claims the server is up; with --discovery, register in etcd
     now (server/elastic.py, which also drains and switches roles live);
  3. on SIGTERM/SIGINT: deregister (in the background), stop accepting, abort in-flight requests (streams end with
     finish_reason "abort"), wait (bounded) for connections to close, then the lifespan stops
     the engine process; a second SIGINT forces the exit. Returns 0 after a clean stop, 1 if
     the engine process died (the server then stops by itself), 2 (one line on stderr) if the
     engine failed to start (a model it cannot load, an unsupported architecture, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from pdserve.server.app import begin_shutdown, build_app
from pdserve.server.config import ServerConfig

logger = logging.getLogger("pdserve.server")


class _Server(uvicorn.Server):
    """uvicorn.Server that aborts in-flight work on the first signal, logs "ready" once it
    serves, and exits normally."""

    def __init__(self, config: uvicorn.Config, on_exit: Any, ready_line: str, t0: float,
                 on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._on_ready = on_ready
        self._ready_line = ready_line
        self._t0 = t0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            logger.info("%s (started in %.1f s)", self._ready_line, time.monotonic() - self._t0)
            self._on_ready()

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


def serve_app(config: ServerConfig, sock: socket.socket) -> int:
    t0 = time.monotonic()
    app = build_app(config)
    uv_config = uvicorn.Config(app, loop="uvloop", log_level=config.log_level, access_log=config.access_log,
                               timeout_graceful_shutdown=int(max(1, config.shutdown_timeout_s)),
                               timeout_keep_alive=5, lifespan="on")
    host = f"[{config.host}]" if ":" in config.host else config.host
    ready = f"pdserve is ready: http://{host}:{config.port} (model {config.engine.model}" + \
            (f", {config.disagg.mode}" if config.disagg.mode != "null" else "") + ")"
    elastic = app.fastapi.state.elastic

    def on_ready() -> None:
        elastic.register(app.fastapi.state.server)

    def on_exit() -> None:
        elastic.deregister_soon()
        _schedule_shutdown(app)

    server = _Server(uv_config, on_exit=on_exit, ready_line=ready, t0=t0, on_ready=on_ready)
    app.fastapi.state.request_exit = lambda: setattr(server, "should_exit", True)
    logger.info("starting the engine for model %s (port %d is reserved; the server answers once it is ready)",
                config.engine.model, config.port)
    quiet = _StartupFailure(app.fastapi)
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits (3) when the app's start-up fails: answered just below
        if server.started:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        elastic.stop_registration()  # bounded; a server whose engine died leaves etcd now, not a lease TTL later
    if not server.started:
        why = app.fastapi.state.startup_error
        if why is not None:  # the engine's own failure: one line naming it, exit 2
            print(f"pdserve serve: error: {why}", file=sys.stderr)
            return 2
        logger.error("server failed to start")
        return 1
    client = app.fastapi.state.client
    if client is not None and client.dead_reason is not None:
        logger.error("exiting because the engine process died: %s", client.dead_reason)
        logging.shutdown()  # the engine is gone and every socket closed: exit now, so a supervisor
        os._exit(1)  # restarts us within seconds (interpreter teardown took ~3 s more here)
    return 0


class _StartupFailure(logging.Filter):
    """Drops uvicorn's traceback and "Application startup failed" once the engine's start-up
    failure is known: serve_app prints it as one line instead."""

    def __init__(self, fastapi_app: Any) -> None:
        super().__init__()
        self.app = fastapi_app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.state.startup_error is None


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
