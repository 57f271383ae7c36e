"""A server's spans of one request (pdserve/tracing), built when each engine request ends.

`handle` (server/handler.py) puts the request's W3C `traceparent` and `x-request-id` headers in
`REQUEST` (a contextvar: the stream's tasks see it too); `trace_request` then records, per
finished engine request, the server span under that parent and its phases from the engine's
times in the last TokenOut (queue, prefill, decode seconds; the front gets it at the end):

    prefill  pdserve.prefill ── prefill queue (bootstrap + scheduler queue), prefill forward,
                                KV transfer (first token → the transfer is done)
    decode   pdserve.decode  ── decode queue (prealloc queue + its KV on the way), decode
    unified  pdserve.server  ── prefill queue, prefill forward, decode
With tracing off (NoTracer) it returns at once.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pdserve.engine.messages import TokenOut
from pdserve.tracing import Attrs

if TYPE_CHECKING:
    from pdserve.server.state import ServerState

REQUEST: ContextVar[tuple[str | None, str | None]] = ContextVar("trace_request", default=(None, None))


def trace_request(state: ServerState, rid: str, priority: int, pd: bool, out: TokenOut, e2e_s: float) -> None:
    """Record the spans of engine request `rid` (`pd`: it carried bootstrap fields) that ended with `out`."""
    tracer = state.tracer
    if not tracer.enabled:
        return
    parent, request_id = REQUEST.get()
    mode = state.config.disagg.mode
    end = time.time_ns()
    ns = 1_000_000_000
    queue, prefill, decode = (int(x * ns) for x in (out.queue_time_s, out.prefill_time_s, out.decode_time_s))
    attrs: Attrs = {"pdserve.request_id": request_id or rid, "pdserve.rid": rid,
                    "pdserve.prompt_tokens": out.prompt_tokens, "pdserve.completion_tokens": out.completion_tokens,
                    "pdserve.finish_reason": out.finish_reason or "", "pdserve.priority": priority}
    name = {"prefill": "pdserve.prefill", "decode": "pdserve.decode"}.get(mode, "pdserve.server")
    if mode == "decode" and pd:  # its prefill ran elsewhere: queue + KV wait, decode
        phases = [("decode queue", queue + prefill), ("decode", decode)]
    elif mode == "prefill":
        phases = [("prefill queue", queue), ("prefill forward", prefill), ("KV transfer", decode)]
    else:
        phases = [("prefill queue", queue), ("prefill forward", prefill), ("decode", decode)]
    start = end - int(e2e_s * ns)
    span = tracer.begin(name, parent, start, attrs)
    t = end - sum(d for _, d in phases)
    child = {"pdserve.request_id": attrs["pdserve.request_id"]}
    for phase, seconds in phases:
        tracer.span(phase, span, t, t + seconds, child)
        t += seconds
    span.end(end)
