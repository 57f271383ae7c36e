"""Pure-ASGI middleware of the HTTP front: API-key check and request-body size cap.

Both wrap the FastAPI app once at build time and run on every HTTP request:
- `ApiKeyMiddleware` answers 401 (OpenAI error body) unless `Authorization: Bearer KEY` (or
  `X-API-Key: KEY`) matches; `/health` and `/metrics` stay open.
- `BodyLimitMiddleware` answers 413 when `Content-Length` or the streamed body exceeds the cap;
  otherwise it buffers the body (JSON bodies are read whole anyway) and replays it, then hands
  later `receive()` calls (client disconnects) to the server unchanged. Before a 413 it reads
  and discards the rest of the body (up to `DISCARD_BYTES` / `DISCARD_S`): a client that writes
  its whole body before reading (Python's urllib, curl without Expect) would otherwise see the
  connection reset by unread bytes instead of the 413. A larger body gets its 413 at once.
Streaming responses pass through untouched (no BaseHTTPMiddleware buffering).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pdserve.server.errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/metrics"})
DISCARD_BYTES = 256 * 1024 * 1024  # at most this much of a too-large body is read (and dropped) before its 413
DISCARD_S = 30.0  # ... for at most this long


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
                return True
        key = _header(scope, b"x-api-key")
        return key is not None and hmac.compare_digest(key.strip().encode(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, seen: int = 0,
                         more: bool = True) -> None:
        """Discard the rest of the body (bounded; `seen` bytes were read), then answer 413."""
        if more:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCARD_S):
                    while seen <= DISCARD_BYTES:
                        message = await receive()
                        if message["type"] != "http.request":
                            return  # the client left
                        seen += len(message.get("body", b""))
                        if not message.get("more_body", False):
                            break
        resp = error_response(413, f"request body is larger than {self.max_bytes} bytes",
                              code="request_too_large", headers={"Connection": "close"})
        await resp(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._too_large(scope, receive, send, more=declared <= DISCARD_BYTES)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect before the body was read
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, size, message.get("more_body", False))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
