"""TTFT deadlines in the engine: requests dropped before their prefill when it cannot end in time.

Lifecycle of a request with a deadline (`GenerateReq.deadline`, the wall clock the front aims its
first token at):
  add_request ─▶ Deadlines.add ─▶ each step `expire`: its prefill has not begun and now + its own
  prefill (predicted by the step model's line a + b x tokens; a PD decode's prealloc queue: 0,
  its prefill runs elsewhere) is past the deadline ─▶ its rid is returned to be aborted, the reason
  kept ─▶ finish_request takes the reason (`reason`) and answers 503 deadline_exceeded.
  Its prefill began (or it finished) ─▶ forgotten: from then on the front keeps the deadline
  (server/generation.py answers 503 if no first token came by it).
"""

from __future__ import annotations

import time

from pdserve.engine.pd.state import DecodeTransfer
from pdserve.engine.request import Request
from pdserve.engine.stats import prefill_seconds


class Deadlines:
    def __init__(self) -> None:
        self._waiting: list[Request] = []  # requests with a deadline whose prefill has not begun
        self._expired: dict[str, str] = {}  # rid -> why it was dropped (answered with a 503)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, r: Request) -> None:
        self._waiting.append(r)

    def expire(self, live: dict[str, Request], chunk_budget: int, decode_rows: int, a: float, b: float) -> list[str]:
        """The rids whose first token can no longer come by their deadline (to abort: not computed
        for a client who gave up); `live`: the engine's requests, `a`, `b`: the step model's line."""
        now, keep, late_rids = time.time(), [], []
        for r in self._waiting:
            if r.t_admitted is not None or live.get(r.rid) is not r:
                continue  # its prefill began (or it finished): no longer ours to drop
            assert r.deadline is not None
            local = not isinstance(r.transfer, DecodeTransfer)  # the decode's prefill runs elsewhere
            eta = prefill_seconds(r.todo, chunk_budget, decode_rows, a, b) if local else 0.0
            if now + eta > r.deadline:
                late = now + eta - r.deadline
                self._expired[r.rid] = f"deadline exceeded: the first token would come {late:.3f} s after the deadline"
                late_rids.append(r.rid)
            else:
                keep.append(r)
        self._waiting = keep
        return late_rids

    def reason(self, rid: str) -> str | None:
        """Why `rid` was dropped at its deadline (once), None if it was not."""
        return self._expired.pop(rid, None)
