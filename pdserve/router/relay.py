"""Moving a worker's answer to the client, and the shape of a failed attempt.

`relay_stream` writes a streaming answer through as it arrives (no buffering beyond one TCP
read): the response head goes out with the first body bytes, which is the moment after
which a request can no longer be retried. A worker that fails mid-stream ends an SSE stream
with an OpenAI-style `data: {"error": ...}` event (other streams are cut). `Failure` records a
failed attempt: what to tell the client if no retry succeeds, and whether a retry is allowed.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from pdserve.router.http.client import UpstreamError, UpstreamResponse
from pdserve.router.http.protocol import Response
from pdserve.router.request import RequestCtx, error_body
from pdserve.router.resilience import retryable_status


class Failure:
    __slots__ = ("body", "content_type", "retryable", "sent", "status")

    def __init__(self, status: int, body: bytes, content_type: str | None = "application/json",
                 retryable: bool = True, sent: bool = False) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retryable = retryable
        self.sent = sent

    @classmethod
    def upstream(cls, exc: UpstreamError, who: str) -> Failure:
        status = 504 if exc.kind == "timeout" else 502
        return cls(status, error_body(status, f"{who}: {exc}", code=f"worker_{exc.kind}"))

    @classmethod
    def answer(cls, status: int, body: bytes, content_type: str | None) -> Failure:
        return cls(status, body, content_type, retryable=retryable_status(status))

    def response(self, ctx: RequestCtx) -> Response:
        return Response(self.body, self.status, self.content_type, ctx.resp_headers)


def is_sse(content_type: str | None) -> bool:
    return bool(content_type) and content_type.startswith("text/event-stream")  # type: ignore[union-attr]


def sse_error(message: str, code: str) -> bytes:
    return b"data: " + msgspec.json.encode(msgspec.json.decode(error_body(502, message, code=code))) + b"\n\n"


async def relay_stream(ctx: RequestCtx, resp: UpstreamResponse, first: bytes | None,
                       transform: Callable[[bytes], bytes] | None = None,
                       flush: Callable[[], bytes] | None = None) -> UpstreamError | None:
    """Send the head, `first` (already read) and the rest of `resp`; returns a mid-stream error."""
    writer = ctx.req.writer
    ctype = resp.content_type
    headers = ctx.resp_headers + ([("cache-control", "no-cache")] if is_sse(ctype) else [])
    await writer.start(resp.status, headers, ctype)
    try:
        chunk = first
        while True:
            if chunk is None:
                chunk = await resp.next_chunk()
                if chunk is None:
                    break
            await writer.write(transform(chunk) if transform else chunk)
            chunk = None
        if flush is not None:
            await writer.write(flush())
    except UpstreamError as exc:
        if is_sse(ctype):
            await writer.write(sse_error(f"the worker failed mid-stream: {exc}", f"worker_{exc.kind}"))
            await writer.finish()
        return exc
    await writer.finish()
    return None
