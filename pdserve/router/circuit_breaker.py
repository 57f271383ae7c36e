"""Per-worker circuit breaker: closed → open → half-open → closed.

Lifecycle: a worker starts *closed* (traffic flows). `failure_threshold` consecutive failures
(5xx answers, connection errors, failed health checks) *open* it: the worker gets no traffic
for `open_duration_s`. After that the next `allow()` moves it to *half-open*, where traffic
flows again as a trial: `success_threshold` successes close it, any failure re-opens it.
A disabled breaker always allows. Time comes from an injectable clock (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.router.config import CircuitConfig

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_state", "_successes", "cfg", "opened_count")

    def __init__(self, cfg: CircuitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self.opened_count = 0

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cfg.open_duration_s:
            self._state = HALF_OPEN
            self._successes = 0
        return self._state

    def allow(self) -> bool:
        return not self.cfg.enabled or self._state == CLOSED or self.state != OPEN

    def record(self, success: bool) -> None:
        if not self.cfg.enabled:
            return
        state = self.state
        if success:
            self._failures = 0
            if state == HALF_OPEN:
                self._successes += 1
                if self._successes >= self.cfg.success_threshold:
                    self._state = CLOSED
            return
        self._failures += 1
        if state == HALF_OPEN or (state == CLOSED and self._failures >= self.cfg.failure_threshold):
            self._open()

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._successes = 0
        self.opened_count += 1

    def reset(self) -> None:
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
