"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` for every failure.

Handlers raise `APIError` (or a pydantic ValidationError / SamplingError, converted here);
`install_error_handlers` maps those, Starlette's 404/405 and anything unexpected to JSON bodies
of that shape, so no client ever sees a bare traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from pdserve.engine.sampling_params import SamplingError

logger = logging.getLogger("pdserve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | int | None = None, type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers  # e.g. Retry-After on an overload refusal


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None,
                   type: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = msgspec.json.encode(error_body(status, message, param, code, type))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def api_error_response(exc: APIError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)


def _clean_loc(loc: Any) -> list[str]:
    # drop 'body' and pydantic's union-member tags such as 'str' / 'list[int]' from the path
    parts = [str(p) for p in loc if p != "body"]
    return [p for p in parts if not (p.startswith(("list[", "dict[", "tuple[")) or p in ("str", "int", "float", "bool"))]


def from_validation_error(exc: ValidationError | RequestValidationError, prefix: str = "") -> APIError:
    """The first pydantic error as a 400 naming the field (dotted path) in `param`."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    locs = [".".join(([prefix] if prefix else []) + _clean_loc(e.get("loc", ()))) for e in errors]
    param = locs[0] or None
    same = [e for e, loc in zip(errors, locs) if loc == locs[0]]
    if len(same) > 1:  # a union: none of its types matched
        got = type(same[0].get("input")).__name__
        msg = f"invalid type ({got}); {'; or '.join(dict.fromkeys(e.get('msg', '') for e in same))}"
    else:
        msg = errors[0].get("msg", "invalid value")
    others = len(set(locs)) - 1
    more = f" (and {others} more invalid fields)" if others > 0 else ""
    return bad_request(f"{param or 'request'}: {msg}{more}", param=param)


def from_sampling_error(exc: SamplingError) -> APIError:
    return bad_request(str(exc), param=exc.param, code=exc.code)


def _counted(request: Request, exc: APIError) -> Response:
    state = getattr(request.app.state, "server", None)
    if state is not None:
        state.metrics.error(exc.status)
    return api_error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> Response:
        return _counted(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(request: Request, exc: RequestValidationError) -> Response:
        return _counted(request, from_validation_error(exc))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> Response:
        return _counted(request, from_validation_error(exc))

    @app.exception_handler(SamplingError)
    async def _sampling(request: Request, exc: SamplingError) -> Response:
        return _counted(request, from_sampling_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
