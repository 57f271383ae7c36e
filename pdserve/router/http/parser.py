"""Incremental HTTP/1.1 message parsing shared by the router's front server and its upstream client.

Pure functions and small state machines over a `bytearray` buffer (no I/O):
  - `parse_head(buf, limit)` cuts one complete head (start line + headers) off the buffer;
  - `parse_request_line` / `parse_status_line` split the start line;
  - `parse_headers` turns header lines into a dict of lower-cased names (duplicates joined);
  - `body_framing` decides how the body is delimited (Content-Length, chunked, until close)
    and refuses ambiguous framing (both Content-Length and Transfer-Encoding, bad lengths),
    the classic request-smuggling vectors;
  - `ChunkedDecoder` decodes a chunked body incrementally, with bounded size lines/trailers.
Strict on purpose: lines must end in CRLF, header names must be tokens, no obs-fold.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD = re.compile(rb"^[A-Z]+$")
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 16 * 1024

# framing kinds
NO_BODY, FIXED, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3


class ParseError(Exception):
    """Malformed HTTP; `status` is what a server should answer (400, 413, 431, 501, 505)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_head(buf: bytearray, limit: int) -> bytes | None:
    """Remove and return one complete head (without the blank line), or None if incomplete."""
    idx = buf.find(HEAD_END)
    if idx < 0:
        if len(buf) > limit:
            raise ParseError("request headers too large", 431)
        return None
    if idx > limit:
        raise ParseError("request headers too large", 431)
    head = bytes(buf[:idx])
    del buf[:idx + 4]
    return head


def parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise ParseError(f"malformed header line {line[:60]!r}")
        key = name.lower().decode("ascii")
        val = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host"):
                if headers[key] != val:
                    raise ParseError(f"conflicting {key} headers")
                continue
            headers[key] = f"{headers[key]}, {val}"
        else:
            headers[key] = val
    return headers


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """`GET /path?q HTTP/1.1` -> (method, target, version)."""
    parts = line.split(b" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]) or not parts[1]:
        raise ParseError(f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ParseError(f"unsupported HTTP version {version[:20]!r}", 505)
    if not (target.startswith(b"/") or target == b"*" or target.startswith(b"http")):
        raise ParseError(f"malformed request target {target[:80]!r}")
    try:
        return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("request target must be ASCII (percent-encode it)") from None


def parse_status_line(line: bytes) -> tuple[str, int]:
    """`HTTP/1.1 200 OK` -> (version, status)."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise ParseError(f"malformed status line {line[:80]!r}", 502)
    return parts[0].decode("ascii"), int(parts[1])


def body_framing(headers: dict[str, str], *, is_response: bool, status: int = 200,
                 method: str = "") -> tuple[int, int]:
    """(kind, length) of the body that follows a head."""
    if is_response and (100 <= status < 200 or status in (204, 304) or method == "HEAD"):
        return NO_BODY, 0
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise ParseError("both Content-Length and Transfer-Encoding")
        if te.strip().lower() != "chunked":
            raise ParseError(f"unsupported Transfer-Encoding {te[:40]!r}", 501)
        return CHUNKED, 0
    if cl is not None:
        if not cl.isdigit() or len(cl) > 18:
            raise ParseError(f"invalid Content-Length {cl[:40]!r}")
        n = int(cl)
        return (FIXED, n) if n else (NO_BODY, 0)
    return (UNTIL_CLOSE, 0) if is_response else (NO_BODY, 0)


class ChunkedDecoder:
    """Feed it a buffer; it consumes what it can and returns decoded data until `done`."""

    __slots__ = ("_need", "_state", "done")

    def __init__(self) -> None:
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._need = 0
        self.done = False

    def feed(self, buf: bytearray) -> list[bytes]:
        out: list[bytes] = []
        while buf and not self.done:
            if self._state == 0:
                idx = buf.find(CRLF)
                if idx < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise ParseError("chunk size line too long")
                    break
                size_txt = bytes(buf[:idx]).split(b";", 1)[0].strip()
                del buf[:idx + 2]
                if not size_txt or len(size_txt) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_txt):
                    raise ParseError(f"invalid chunk size {size_txt[:20]!r}")
                self._need = int(size_txt, 16)
                self._state = 1 if self._need else 3
            elif self._state == 1:
                take = min(self._need, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self._need -= take
                if self._need == 0:
                    self._state = 2
            elif self._state == 2:
                if len(buf) < 2:
                    break
                if buf[:2] != CRLF:
                    raise ParseError("missing CRLF after chunk data")
                del buf[:2]
                self._state = 0
            else:  # trailers: lines until an empty one
                if buf[:2] == CRLF:
                    del buf[:2]
                    self.done = True
                    break
                idx = buf.find(HEAD_END)
                if idx < 0:
                    if len(buf) > MAX_TRAILERS:
                        raise ParseError("chunked trailers too large")
                    break
                del buf[:idx + 4]
                self.done = True
        return out


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Entity", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())
