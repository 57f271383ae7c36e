"""One request as the router handles it: its context, its id, and the error answers the router gives itself.

Errors: everything the router answers itself is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` with the type derived from the status, the
same shape the workers use, so a client sees one error format whoever answered. Code raises
`RouterError` anywhere on the request path; the app turns it into that body.

Context: the app creates a `RequestCtx` for each generation request; the JSON body is parsed
only when something needs it (PD injection, cache-aware text, logprob merging), so plain load
balancing forwards the raw bytes untouched. Request ids come from the first configured
request-id header the client sent (if it is sane) or are generated (process prefix + counter,
cheap and unique).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pdserve.router.http.protocol import Request, Response
from pdserve.tracing import TRACEPARENT, Span, Tracer
from pdserve.router.usage import Usage

# -- errors ------------------------------------------------------------------------------------
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
          500: "internal_server_error", 501: "invalid_request_error", 502: "bad_gateway",
          503: "service_unavailable", 504: "timeout_error", 505: "invalid_request_error"}

_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "request_too_large", 429: "too_many_requests",
          431: "headers_too_large", 501: "not_implemented", 505: "http_version_not_supported"}


class RouterError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status)
        self.param = param
        self.headers = headers or []  # e.g. retry-after on an overload refusal


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                          "param": param, "code": code or _CODES.get(status)}})


def protocol_error_body(status: int, message: str) -> bytes:
    """For the HTTP layer (malformed requests, 413 before the body, ...)."""
    return error_body(status, message)


# -- request context ---------------------------------------------------------------------------
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)
_decoder = msgspec.json.Decoder()


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_COUNTER):x}"


def pick_request_id(headers: dict[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        value = headers.get(name)
        if value and len(value) <= 128 and value.isascii() and value.isprintable():
            return value
    return new_request_id()


def _messages_text(messages: Any) -> str:
    parts: list[str] = []
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if isinstance(value[0], str):
            return value[0]
        if isinstance(value[0], int):
            return " ".join(map(str, value))
        if isinstance(value[0], list):
            return " ".join(map(str, value[0]))
    return ""


def _items_text(value: Any) -> str:
    """/v1/responses' input: a string, or items (messages' text; tool outputs)."""
    if isinstance(value, str) or not isinstance(value, list):
        return value if isinstance(value, str) else ""
    parts = [_messages_text([item]) or (item.get("output") if isinstance(item.get("output"), str) else "")
             for item in value if isinstance(item, dict)]
    return "\n".join(p for p in parts if p)


def routing_text(route: str, body: dict[str, Any]) -> str:
    if route == "/v1/chat/completions":
        return _messages_text(body.get("messages"))
    if route == "/v1/responses":
        return _items_text(body.get("input"))
    if route == "/v1/completions":
        return _prompt_text(body.get("prompt"))
    text = body.get("text")
    return _prompt_text(text if text is not None else body.get("input_ids"))


class RequestCtx:
    __slots__ = ("_json", "_mark", "_text", "fwd_headers", "prompt_ids", "req", "resp_headers", "rid", "route",
                 "span", "t0", "tracer", "usage")

    def __init__(self, req: Request, rid: str, route: str, client_auth: str | None, tracer: Tracer | None = None,
                 span: Span | None = None) -> None:
        self.req = req
        self.rid = rid
        self.route = route
        self.t0 = time.perf_counter()
        self._json: dict[str, Any] | None = None
        self._text: str | None = None
        self.prompt_ids: list[int] | None | bool = False  # router/prompt_ids.py: False = not looked up yet
        self.tracer, self.span = tracer, span  # the request's router span (tracing on): the legs' parent
        self._mark = time.time_ns() if span is not None else 0
        self.usage: Usage | None = None  # what the answer cost (router/usage.py), once relayed
        extra = f"x-request-id: {rid}\r\n"
        if span is not None and span.traceparent:
            extra += f"{TRACEPARENT}: {span.traceparent}\r\n"
        if client_auth is not None:
            extra += f"authorization: {client_auth}\r\n"
        self.fwd_headers = extra.encode("latin-1")
        self.resp_headers = [("x-request-id", rid)]

    def json(self) -> dict[str, Any]:
        if self._json is None:
            try:
                obj = _decoder.decode(self.req.body)
            except msgspec.DecodeError as exc:
                raise RouterError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(obj, dict):
                raise RouterError(400, "request body must be a JSON object", code="invalid_json")
            self._json = obj
        return self._json

    def replace_body(self, body: dict[str, Any]) -> None:
        """Forward `body` instead of what the client sent (router/responses.py)."""
        self._json, self._text = body, None
        self.req.body = msgspec.json.encode(body)

    def mark(self) -> None:
        """A pick begins (tracing: the next `picked` span starts here)."""
        if self.span is not None:
            self._mark = time.time_ns()

    def picked(self) -> None:
        """The worker(s) are picked: a "router pick" span since the last `mark` (tracing on)."""
        if self.span is not None and self.tracer is not None:
            self.tracer.span("router pick", self.span, self._mark, time.time_ns(), {"pdserve.request_id": self.rid})

    def text(self) -> str:
        if self._text is None:
            self._text = routing_text(self.route, self.json())
        return self._text


RouteFn = Callable[[Request, str], Awaitable["Response | None"]]  # a route's handler: (request, request id)
