"""OpenAI-style error bodies for everything the router answers itself.

`{"error": {"message", "type", "param", "code"}}` with the type derived from the status, the
same shape the workers use, so a client sees one error format whoever answered.
"""

from __future__ import annotations

import msgspec

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
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status)
        self.param = param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                          "param": param, "code": code or _CODES.get(status)}})


def protocol_error_body(status: int, message: str) -> bytes:
    """For the HTTP layer (malformed requests, 413 before the body, ...)."""
    return error_body(status, message)
