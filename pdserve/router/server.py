"""Running the router: bind, start, serve until a signal, stop cleanly.

`serve(cfg)` lifecycle:
  1. bind the listening socket first (a taken port fails at once, before any worker is
     contacted);
  2. `RouterApp.start()`: one round of health checks (bounded by the health timeout), then
     the background loops;
  3. the HTTP server accepts connections; `ready` (if given) is called with the bound port;
     start-up objects are frozen out of the cyclic GC (short pauses under load);
  4. on SIGTERM/SIGINT (or `stop` being set): stop accepting, close idle connections, let
     in-flight requests finish for up to `shutdown_timeout_s`, abort the rest (which cancels
     their upstream legs), stop the app. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from pdserve.router.app import RouterApp
from pdserve.router.config import RouterConfig
from pdserve.router.http.protocol import HttpListener
from pdserve.router.request import protocol_error_body
from pdserve.sockets import bind_socket as bind_shared


logger = logging.getLogger("pdserve.router")


def bind_socket(host: str, port: int) -> socket.socket:
    sock = bind_shared(host, port)
    sock.setblocking(False)
    return sock


async def serve(cfg: RouterConfig, sock: socket.socket | None = None, stop: asyncio.Event | None = None,
                ready: Callable[[RouterApp, int], None] | None = None) -> int:
    sock = sock or bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = threading.current_thread() is threading.main_thread()
    if signals:
        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                logger.warning("second %s: exiting now", sig.name)
                os._exit(1)
            logger.info("received %s: shutting down", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    app = RouterApp(cfg)
    server = HttpListener(app.handle, protocol_error_body, max_body=cfg.limits.max_payload_bytes)
    try:
        await app.start()
        await server.start(sock)
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: keeps full collections short
        mode = "PD" if cfg.pd else "regular"
        policy = ", ".join(f"{r}: {p.name}" for r, p in app.policies.items())
        logger.info("pdserve router on http://%s:%d (%s mode, %d workers, policy %s)", cfg.host, port, mode,
                    len(cfg.workers), policy)
        if ready is not None:
            ready(app, port)
        await stop.wait()
        await server.close(cfg.shutdown_timeout_s)
    finally:
        await app.stop()
        sock.close()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    logger.info("router stopped")
    return 0
