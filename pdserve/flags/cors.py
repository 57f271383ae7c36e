"""CORS for the server and the router: vLLM's flags, its defaults, and the headers they mean.

A browser UI on another origin first sends a preflight (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`); the answer says which origins, methods and headers may
follow. Every later answer to that origin carries `Access-Control-Allow-Origin`. The server
hands `CorsConfig` to Starlette's CORSMiddleware; the router, with its own HTTP layer, calls
`preflight_headers` / `response_headers` (same rules as Starlette's: `*` echoes the origin
when credentials are allowed, since browsers refuse `*` with credentials).

    --allowed-origins   '["*"]' (default) or '["http://localhost:3000"]' (JSON, or a comma list)
    --allowed-methods   '["*"]'      --allowed-headers '["*"]'      --allow-credentials (off)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from pdserve.flags.table import Flag

PREFLIGHT_MAX_AGE = "600"
ALLOW_ORIGIN = "access-control-allow-origin"
_SAFE_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def string_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings (vLLM's form) or a comma-separated list."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return tuple(value)
    return tuple(v.strip() for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class CorsConfig:
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_origins)


CORS_FLAGS: tuple[Flag, ...] = (
    Flag(("--allowed-origins",), "cors.allowed_origins", string_list,
         "origins a browser page may call from (CORS): a JSON list or a comma list; '[]' turns CORS off",
         metavar="JSON"),
    Flag(("--allowed-methods",), "cors.allowed_methods", string_list, "CORS: methods allowed", metavar="JSON"),
    Flag(("--allowed-headers",), "cors.allowed_headers", string_list, "CORS: request headers allowed",
         metavar="JSON"),
    Flag(("--allow-credentials",), "cors.allow_credentials", None, "CORS: allow cookies and auth headers",
         shown="off"),
)


def _allow_origin(cfg: CorsConfig, origin: str) -> str | None:
    if "*" in cfg.allowed_origins:
        return origin if cfg.allow_credentials else "*"
    return origin if origin in cfg.allowed_origins else None


def response_headers(cfg: CorsConfig, origin: str | None) -> list[tuple[str, str]]:
    """Headers for an ordinary answer to a request from `origin` (none when not allowed)."""
    if origin is None or not cfg.enabled:
        return []
    allowed = _allow_origin(cfg, origin)
    if allowed is None:
        return []
    out = [(ALLOW_ORIGIN, allowed)]
    if cfg.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    if allowed != "*":
        out.append(("vary", "Origin"))
    return out


def preflight_headers(cfg: CorsConfig, origin: str, method: str, headers: str | None) -> list[tuple[str, str]] | None:
    """The answer's headers to a preflight, or None when the origin, method or a header is refused."""
    allowed = _allow_origin(cfg, origin) if cfg.enabled else None
    methods = _SAFE_METHODS if "*" in cfg.allowed_methods else tuple(m.upper() for m in cfg.allowed_methods)
    if allowed is None or method.upper() not in methods:
        return None
    asked = [h.strip().lower() for h in (headers or "").split(",") if h.strip()]
    if "*" in cfg.allowed_headers:
        allow_headers = ", ".join(asked)
    else:
        permitted = {h.lower() for h in cfg.allowed_headers} | {"accept", "accept-language", "content-language",
                                                                "content-type"}
        if any(h not in permitted for h in asked):
            return None
        allow_headers = ", ".join(sorted(permitted))
    out = [(ALLOW_ORIGIN, allowed), ("access-control-allow-methods", ", ".join(methods)),
           ("access-control-max-age", PREFLIGHT_MAX_AGE), ("vary", "Origin")]
    if allow_headers:
        out.append(("access-control-allow-headers", allow_headers))
    if cfg.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return out
