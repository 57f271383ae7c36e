"""The FastAPI application of one pdserve server.

`build_app(config)` returns an ASGI app whose lifespan owns the engine:
  startup  - `EngineClient.start()` spawns the engine process and waits until its model is
             loaded (uvicorn binds the port only after this, so /health answers only when
             ready), then `ServerState` (tokenizer, metrics, caps) goes into `app.state.server`;
             an engine that fails to start leaves one line in `app.state.startup_error`;
  serving  - routers: OpenAI (/v1/completions, chat, responses, ...), native (/generate), admin
             (health, info, load, ...), elastic (/drain, /switch_role: server/elastic.py);
             errors always come back as OpenAI error bodies; CORS, API key and body cap run
             as ASGI middleware around everything;
  shutdown - `begin_shutdown(app)` (called from the signal handler) refuses new work and ends
             in-flight streams with finish_reason "abort"; the lifespan's exit then stops the
             engine process and removes its sockets.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from pdserve.server import (native_generate, openai_chat, openai_completions, openai_responses, routes_admin,
                            routes_elastic, routes_hicache, routes_tokenize)
from pdserve.server.config import ServerConfig
from pdserve.server.elastic import Elastic
from pdserve.server.dp_client import EngineHandle, engine_client
from pdserve.server.engine_client import EngineDeadError
from pdserve.server.errors import install_error_handlers
from pdserve.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from pdserve.server.state import ServerState

logger = logging.getLogger("pdserve.server")


def build_fastapi(config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = engine_client(config.engine, config.engine_start_timeout_s, lambda _: _request_exit(app),
                               config.disagg)
        app.state.client = client
        try:
            try:
                info = await client.start()
            except EngineDeadError as exc:  # one line (serve_app prints it, exit 2), not a traceback
                app.state.startup_error = one_line(str(exc))
                raise
            app.state.server = ServerState.create(config, client, info)
            logger.info("engine loaded: model %s, max_model_len %d, %d KV pages of %d tokens",
                        info.model_path, info.max_model_len, info.num_pages, info.page_size)
            yield
        finally:
            state = app.state.server
            if state is not None:
                state.tracer.close()  # exports the spans still queued
            app.state.server = None
            await client.close(config.shutdown_timeout_s)
            logger.info("engine stopped")

    app = FastAPI(title="pdserve", version=routes_admin.VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = None
    app.state.client = None
    app.state.request_exit = None  # set by the launcher: ask the HTTP server to stop
    app.state.startup_error = None  # why the engine did not start (one line)
    app.state.elastic = Elastic(config)  # drain, live role switch, discovery record (server/elastic.py)
    install_error_handlers(app)
    app.include_router(openai_completions.router)
    app.include_router(openai_chat.router)
    app.include_router(openai_responses.router)
    app.include_router(native_generate.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_hicache.router)
    app.include_router(routes_tokenize.router)
    app.include_router(routes_elastic.router)
    return app


def build_app(config: ServerConfig) -> Any:
    """The ASGI app to serve: FastAPI wrapped in the body cap, (if set) the API key check and,
    outermost, CORS (a browser's preflight carries no key; flags/cors.py)."""
    fastapi_app = build_fastapi(config)
    app: Any = BodyLimitMiddleware(fastapi_app, config.max_body_bytes)
    if config.api_key:
        app = ApiKeyMiddleware(app, config.api_key)
    cors = config.cors
    if cors.enabled:
        app = CORSMiddleware(app, allow_origins=list(cors.allowed_origins), allow_methods=list(cors.allowed_methods),
                             allow_headers=list(cors.allowed_headers), allow_credentials=cors.allow_credentials)
    app.fastapi = fastapi_app  # type: ignore[attr-defined]
    return app


def one_line(message: str) -> str:
    """The line that names a failure: a traceback's last line (the exception and its message)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the engine failed to start"


def _request_exit(app: FastAPI) -> None:
    hook = getattr(app.state, "request_exit", None)
    if hook is not None:
        hook()


def begin_shutdown(fastapi_app: FastAPI) -> None:
    """Refuse new generations and end the in-flight ones (finish_reason "abort")."""
    client: EngineHandle | None = getattr(fastapi_app.state, "client", None)
    if client is not None:
        client.closing = True
        client.abort_all("server shutting down")
