"""What one generation request cost, as the router saw it: prompt and output tokens, TTFT, inter-token latency.

The SLA planner (pdserve/planner) reads these from the router's /metrics every interval
(`<prefix>_router_prompt_tokens_total`, `..._output_tokens_total`, `..._generations_total`,
`..._ttft_seconds`, `..._itl_seconds`; router/metrics.py). Per request:

  prompt tokens   the worker's PROMPT_TOKENS_HEADER (decode leg in PD mode: same prompt)
  whole answer    output tokens: its COMPLETION_TOKENS_HEADER; no TTFT or ITL
  stream          `StreamMeter` sees each chunk as relayed (router/forward.py relay_stream) and
                  counts its token events: SSE data frames less `[DONE]`, a chat stream's role
                  frame, the empty finish delta and the usage-only frame. A token event is one
                  engine step's output for one sequence (one token without speculation):

      data: {"delta":{"role":"assistant","content":""}}   not counted (sent at once)
      data: {..."delta":{"content":" Paris"}...}           1  <- TTFT: t0 -> first counted event
      data: {..."delta":{"content":"."}...}                2
      data: {..."delta":{},"finish_reason":"stop"}         not counted
      data: [DONE]                                         not counted
                                                               ITL = (t_last - t_first) / (2 - 1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pdserve.contract import COMPLETION_TOKENS_HEADER, PROMPT_TOKENS_HEADER

_FRAME = b"\ndata: "
_NOT_TOKENS = (b"data: [DONE]", b'"delta":{"role":"assistant","content":""}', b'"delta":{}', b'"choices":[]')


def _int_header(headers: dict[str, str], name: str) -> int | None:
    raw = headers.get(name)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass
class Usage:
    prompt_tokens: int | None
    output_tokens: int | None
    ttft_s: float | None = None
    itl_s: float | None = None  # mean gap between token events of a stream (None: fewer than 2)

    @classmethod
    def whole(cls, headers: dict[str, str]) -> Usage:
        return cls(_int_header(headers, PROMPT_TOKENS_HEADER), _int_header(headers, COMPLETION_TOKENS_HEADER))


class StreamMeter:
    """Counts a relayed stream's token events (see the module docstring) with their times."""

    __slots__ = ("events", "prompt_tokens", "t0", "t_first", "t_last")

    def __init__(self, headers: dict[str, str], t0: float) -> None:
        self.prompt_tokens = _int_header(headers, PROMPT_TOKENS_HEADER)
        self.t0 = t0
        self.events = 0
        self.t_first = self.t_last = 0.0

    def feed(self, chunk: bytes) -> None:
        n = chunk.count(_FRAME) + chunk.startswith(_FRAME[1:]) - sum(chunk.count(p) for p in _NOT_TOKENS)
        if n > 0:
            now = time.perf_counter()
            if not self.events:
                self.t_first = now
            self.t_last = now
            self.events += n

    def usage(self) -> Usage:
        itl = (self.t_last - self.t_first) / (self.events - 1) if self.events > 1 else None
        return Usage(self.prompt_tokens, self.events, self.t_first - self.t0 if self.events else None, itl)
