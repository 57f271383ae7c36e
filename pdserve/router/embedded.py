"""A router running in a background thread of this process (tests, benchmarks, embedding).

Lifecycle: `EmbeddedRouter(cfg).start()` runs `serve()` on a uvloop event loop in a daemon
thread, binds `cfg.host:cfg.port` (port 0: a free one), and returns once the router
listens (bounded wait); `url` is its address, `app` the live `RouterApp` (read its state;
change it only through `call()`, which runs a function on the router's loop); `stop()` shuts it
down like a SIGTERM would and joins the thread (bounded).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import uvloop

from pdserve.router.app import RouterApp
from pdserve.router.config import RouterConfig
from pdserve.router.server import bind_socket, serve

T = TypeVar("T")


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
