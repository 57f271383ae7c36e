"""Running the router: bind, start, serve until a signal (or `stop`), stop cleanly; in this process or a thread.

`serve(cfg)` lifecycle (`pdserve router` runs it as the process's main loop):
  1. bind the listening socket first (a taken port fails at once, before any worker is
     contacted);
  2. `RouterApp.start()`: one round of health checks (bounded by the health timeout), then
     the background loops;
  3. the HTTP listener accepts connections (and, with `--prometheus-port`, a second one that
     serves only /metrics, as sglang-router does); `ready` (if given) is called with the bound port;
     start-up objects are frozen out of the cyclic GC (short pauses under load);
  4. on SIGTERM/SIGINT (or `stop` being set): stop accepting, close idle connections, let
     in-flight requests finish for up to `shutdown_timeout_s`, abort the rest (which cancels
     their upstream legs), stop the app. A second signal exits at once.

`EmbeddedRouter` runs the same `serve()` in a background thread of this process (tests,
benchmarks, embedding): `EmbeddedRouter(cfg).start()` runs it on a uvloop event loop in a
daemon thread, binds `cfg.host:cfg.port` (port 0: a free one), and returns once the router
listens (bounded wait); `url` is its address, `app` the live `RouterApp` (read its state;
change it only through `call()`, which runs a function on the router's loop); `stop()` shuts it
down like a SIGTERM would and joins the thread (bounded).
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
from typing import Any, TypeVar

import uvloop

from pdserve.router.app import RouterApp
from pdserve.router.config import RouterConfig
from pdserve.flags.sockets import bind_socket as bind_shared
from pdserve.router.http.protocol import HttpListener
from pdserve.router.request import protocol_error_body


logger = logging.getLogger("pdserve.router")
T = TypeVar("T")


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
    listener = HttpListener(app.handle, protocol_error_body, max_body=cfg.limits.max_payload_bytes)
    metrics_listener: HttpListener | None = None
    try:
        if cfg.prometheus_port is not None:  # sglang-router's metrics port (bound before anything starts)
            metrics_sock = bind_socket(cfg.prometheus_host, cfg.prometheus_port)
            metrics_listener = HttpListener(app.metrics_only, protocol_error_body, max_body=1 << 16)
            await metrics_listener.start(metrics_sock)
            logger.info("metrics on http://%s:%d/metrics", cfg.prometheus_host, metrics_sock.getsockname()[1])
        await app.start()
        await listener.start(sock)
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: keeps full collections short
        mode = "PD" if cfg.pd else "regular"
        policy = ", ".join(f"{r}: {p.name}" for r, p in app.policies.items())
        logger.info("pdserve router on http://%s:%d (%s mode, %d workers, policy %s)", cfg.host, port, mode,
                    len(app.registry.all()), policy)
        if ready is not None:
            ready(app, port)
        await stop.wait()
        await listener.close(cfg.shutdown_timeout_s)
    finally:
        if metrics_listener is not None:
            await metrics_listener.close(1.0)
        await app.stop()
        sock.close()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    logger.info("router stopped")
    return 0


class EmbeddedRouter:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.app: RouterApp | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pdserve-router", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        try:
            uvloop.run(self._run())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sock = bind_socket(self.cfg.host, self.cfg.port)

        def ready(app: RouterApp, port: int) -> None:
            self.app, self.port = app, port
            self._ready.set()

        await serve(self.cfg, sock=sock, stop=self._stop, ready=ready)

    def start(self, timeout: float = 30.0) -> EmbeddedRouter:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"router did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"router failed to start: {self._error!r}") from self._error
        return self

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn()` on the router's loop (coroutine functions are awaited) and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedRouter:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
