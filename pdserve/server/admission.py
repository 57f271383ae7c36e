"""Admission control: refuse (503 + Retry-After) the work this server cannot serve in time.

Per generation request, before any of its sub-requests reaches the engine (`fan_out` calls
`Admission.admit` with each prompt that this server computes itself: a PD decode computes none
of a PD request's prompt, its prefill does):

    KV       pages held by requests / pool (the engine's LoadBrief)    > max_kv_usage         "kv"
    queue    prompt tokens admitted and not yet past their first token
             (this front's count: exact and immediate) + this request's  > max_queued_tokens  "queued_tokens"
             (a request alone in the queue is never refused for its own size)
    wait     the queue ahead's predicted compute time (the engine's measured step line, its
             chunk budget and decode rows: engine/stats.py's prefill_seconds) > max_queue_wait_s  "queue_wait"
    deadline now + the queue's and its own prompt's compute time is past its TTFT deadline      "deadline"

A refusal is an APIError 503 (code "overloaded", or "deadline_exceeded") with `Retry-After`:
the predicted seconds until the queue is back under the limit (at least `retry_after_s`).
Counted per reason (`sglang:admission_rejected_total{reason}`). The thresholds live in a
mutable `AdmissionConfig` the admin API reads and replaces at runtime (`GET/POST /admission`).

Lifecycle of one admitted prompt's tokens: `admit` reserves them under the sub-request's rid;
`started(rid)` (run_one, right before the engine gets it) keeps them; `done(rid)` (its first
token, an error, or the client gone) releases them. A reservation whose request never started
(the client left before its stream began) is dropped after `RESERVATION_S`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from pdserve.engine.messages import LoadBrief
from pdserve.engine.stats import prefill_seconds
from pdserve.server.config import AdmissionConfig
from pdserve.server.errors import APIError

RESERVATION_S = 5.0  # an admitted request that has not started by then holds nothing


class Admission:
    def __init__(self, config: AdmissionConfig, on_refuse: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_refuse = on_refuse  # counts a refusal by reason (the metrics)
        self.rejected: Counter[str] = Counter()
        self._reserved: dict[str, tuple[int, float]] = {}  # rid -> (tokens, when), not started yet
        self._pending: dict[str, int] = {}  # rid -> tokens, started, no first token yet
        self._pending_sum = 0

    def queued_tokens(self) -> int:
        now = time.monotonic()
        stale = [rid for rid, (_, t) in self._reserved.items() if now - t > RESERVATION_S]
        for rid in stale:
            del self._reserved[rid]
        return self._pending_sum + sum(n for n, _ in self._reserved.values())

    def queue_wait_s(self, brief: LoadBrief | None, tokens: int) -> float:
        """Predicted seconds to compute `tokens` queued prompt tokens (0 before any step was measured)."""
        if brief is None:
            return 0.0
        return prefill_seconds(tokens, brief.chunk_budget, brief.decode_rows, brief.step_s, brief.token_s)

    def figures(self, brief: LoadBrief | None) -> dict[str, float]:
        """What /get_load shows (and the router's admission reads)."""
        queued = self.queued_tokens()
        return {"queued_prefill_tokens": queued, "est_queue_wait_s": self.queue_wait_s(brief, queued),
                "kv_held": brief.held_pages / max(brief.num_pages, 1) if brief is not None else 0.0}

    def admit(self, brief: LoadBrief | None, prompts: list[tuple[str, int]], deadline: float | None) -> None:
        """Reserve the (rid, prompt tokens) this server computes, or raise the 503 (module docstring)."""
        cfg = self.config
        if not cfg.enabled:
            return
        own = sum(n for _, n in prompts)
        ahead = self.queued_tokens()
        queued, wait = ahead + own, self.queue_wait_s(brief, ahead)  # wait: for the queue ahead of it
        if brief is not None and brief.held_pages > cfg.max_kv_usage * brief.num_pages:
            self._refuse("kv", f"KV cache {brief.held_pages / brief.num_pages:.0%} held, over the admission "
                               f"limit of {cfg.max_kv_usage:.0%}", cfg.retry_after_s)
        if cfg.max_queued_tokens is not None and queued > cfg.max_queued_tokens and queued > own:
            self._refuse("queued_tokens", f"{queued} prompt tokens would be queued, over the admission limit of "
                                          f"{cfg.max_queued_tokens}", wait * (1 - cfg.max_queued_tokens / queued))
        if cfg.max_queue_wait_s is not None and wait > cfg.max_queue_wait_s:
            self._refuse("queue_wait", f"its first token is predicted in {wait:.2f} s, over the admission limit of "
                                       f"{cfg.max_queue_wait_s:g} s", wait - cfg.max_queue_wait_s)
        ttft = self.queue_wait_s(brief, queued)
        if deadline is not None and time.time() + ttft > deadline:
            self._refuse("deadline", f"its first token is predicted in {ttft:.2f} s, after its TTFT deadline",
                         ttft, code="deadline_exceeded")
        now = time.monotonic()
        for rid, n in prompts:
            self._reserved[rid] = (n, now)

    def _refuse(self, reason: str, message: str, wait_s: float, code: str = "overloaded") -> None:
        self.rejected[reason] += 1
        if self.on_refuse is not None:
            self.on_refuse(reason)
        retry = max(self.config.retry_after_s, min(wait_s, 60.0))
        raise APIError(503, f"server overloaded: {message}; retry later", code=code,
                       headers={"Retry-After": str(max(1, math.ceil(retry)))})

    def started(self, rid: str) -> None:
        entry = self._reserved.pop(rid, None)
        if entry is not None and rid not in self._pending:
            self._pending[rid] = entry[0]
            self._pending_sum += entry[0]

    def done(self, rid: str) -> None:
        self._reserved.pop(rid, None)
        n = self._pending.pop(rid, None)
        if n is not None:
            self._pending_sum -= n
