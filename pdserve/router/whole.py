"""A non-streaming request that survives its decode's death: the router reads its progress and
answers once.

A PD request without `stream` (one sequence, no logprobs: `migrate.progress_tracked`) goes to its
decode with `pdserve_stream_ids` (contract.STREAM_IDS): once its first token exists the decode
answers an SSE stream of ids comments, then one `data:` event with the whole answer (or, on a
later error, a STATUS_COMMENT with its HTTP status and the error's event), then `[DONE]`
(server/handler.py's `progress`). Nothing reaches the client meanwhile:

    decode ──ids, ids, ... ──▶ StreamTracker (counts the ids) ──▶ collected
              └─ connection lost ─▶ migrate(): the same body + pdserve_resume_ids (the ids so far)
                                     to another decode, whose answer includes them ──▶ collected
    collected ──▶ its `data:` event as the client's JSON answer (status 200, or the STATUS_COMMENT's)

Nothing the client asked for is lost or repeated: the resuming decode counts the resumed ids as
output (max_tokens, stop checks and usage see each token once) and its answer carries their
text. When no decode can continue it, the attempt is a 502 Failure, retried from scratch on a
new pair like any failure before the client saw a byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from pdserve.contract import STATUS_COMMENT
from pdserve.router.forward import Failure
from pdserve.router.http.client import UpstreamError, UpstreamResponse
from pdserve.router.http.protocol import Response
from pdserve.router.migrate import StreamTracker
from pdserve.router.request import RequestCtx, error_body
from pdserve.router.usage import Usage

Write = Callable[[bytes], Awaitable[None]]
OnBreak = Callable[[UpstreamError, Write], Awaitable[bool]]


async def answer_whole(ctx: RequestCtx, resp: UpstreamResponse, first: bytes | None, tracker: StreamTracker,
                       on_break: OnBreak) -> Response | Failure:
    """Read the decode's progress to its end (continuing elsewhere through `on_break` if it
    breaks) and answer the client once."""
    got = bytearray()

    async def keep(data: bytes) -> None:
        got.extend(data)

    try:
        async for chunk in resp.iter_chunks(first):
            got += tracker.feed(chunk)
        got += tracker.flush()
    except UpstreamError as exc:
        if not await on_break(exc, keep):
            return Failure(502, error_body(502, f"the decode failed mid-way and no other could continue: {exc}",
                                           code=f"worker_{exc.kind}"))
    return final_answer(ctx, bytes(got), resp.headers)


def final_answer(ctx: RequestCtx, events: bytes, headers: dict[str, str]) -> Response | Failure:
    """The client's answer from the progress events the tracker kept (ids comments taken out);
    its usage (router/usage.py) from the decode's prompt-tokens header and the answer's own count."""
    status, body = 200, None
    for event in events.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(STATUS_COMMENT):
                status = int(line[len(STATUS_COMMENT):].strip() or b"500")
            elif line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                body = line[6:]
    if body is None:
        return Failure(502, error_body(502, "the decode ended without an answer", code="worker_incomplete"))
    if status >= 400:
        return Failure.answer(status, body, "application/json")
    ctx.usage = Usage(Usage.whole(headers).prompt_tokens, _completion_tokens(body))
    return Response(body, status, "application/json", ctx.resp_headers)


def _completion_tokens(body: bytes) -> int | None:
    try:
        count = msgspec.json.decode(body).get("usage", {}).get("completion_tokens")
    except (msgspec.DecodeError, AttributeError):
        return None
    return count if isinstance(count, int) else None
