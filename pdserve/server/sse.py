"""Server-sent events: `data: <json>\\n\\n` frames, the `[DONE]` sentinel, and a response that
always closes its body iterator (so a client that goes away aborts its engine requests).

Handlers build an async iterator of frames and return `SSEResponse(frames)`. Starlette cancels
the stream when the client disconnects; `SSEResponse` then `aclose()`s the iterator, whose
`finally` blocks send the engine its aborts. An error raised mid-stream becomes one error
frame (OpenAI body) followed by `[DONE]` instead of a broken connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.contract import IDS_COMMENT
from pdserve.server.errors import APIError, error_body

logger = logging.getLogger("pdserve.server")

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def frame(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def ids_comment(ids: list[int]) -> bytes:
    """An SSE comment with the token ids of the event it precedes (contract.STREAM_IDS asked for
    them): SSE clients ignore comments; pdserve's router reads (and strips) them to migrate a stream."""
    return IDS_COMMENT + ",".join(map(str, ids)).encode() + b"\n"


def with_ids(want: bool, ids: list[int], data: bytes | None) -> bytes:
    """`data` (a frame, or None when nothing is shown), led by its ids comment when asked."""
    if not want or not ids:
        return data or b""
    return ids_comment(ids) + (data if data is not None else b"\n")


async def guarded(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`frames`, then `[DONE]`; an exception becomes an error frame (then `[DONE]`)."""
    try:
        async for f in frames:
            yield f
    except APIError as exc:
        yield frame(error_body(exc.status, exc.message, exc.param, exc.code, exc.type))
    except Exception as exc:
        logger.exception("stream failed")
        yield frame(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()
    yield DONE


class SSEResponse(StreamingResponse):
    def __init__(self, frames: AsyncIterator[bytes], status_code: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(guarded(frames), status_code=status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
