"""Guards on the request path: per-worker circuit breakers, the retry rules, the concurrency limit.

Circuit breaker (one per worker): closed → open → half-open → closed. A worker starts
*closed* (traffic flows). `failure_threshold` consecutive failures (5xx answers, connection
errors, failed health checks) *open* it: the worker gets no traffic for `open_duration_s`.
After that the next `allow()` moves it to *half-open* (or at once, via `trial()`, when its
health check succeeds again), where traffic flows again as a trial:
`success_threshold` successes close it, any failure re-opens it. A disabled breaker always
allows. Time comes from an injectable clock (tests).

Retries (on a newly chosen worker or pair, only before the client saw a byte): 408, 429, any
5xx, and connection-level failures. Backoff: `initial * multiplier**n`, capped at `max`, with
+/- `jitter` of randomness so retries from many requests do not synchronise.

Concurrency limit with a bounded queue (`--max-concurrent-requests`, `--queue-size`), per
request: `acquire(priority)` takes a slot at once if one is free; else it waits in the queue
(429 when the queue is full, 408 after `queue_timeout_s`); `release()` hands the slot straight
to the waiter first in (priority, arrival) order: the request's `priority` (lower first, vLLM's
and SGLang's field), FIFO within one; a queued request never races newcomers. Disabled when
`max_concurrent` is -1.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable

from pdserve.router.config import CircuitConfig, RetryConfig
from pdserve.router.request import RouterError

_log = logging.getLogger("pdserve.router")

# -- circuit breaker --------------------------------------------------------------------------
CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    """closed → (failure_threshold failures) open → (open_duration) half-open → (success_threshold
    successes) closed, or (a failure) open again. Opening and closing are logged with `name`."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_state", "_successes", "cfg", "name", "opened_count")

    def __init__(self, cfg: CircuitConfig, clock: Callable[[], float] = time.monotonic, name: str = "") -> None:
        self.cfg = cfg
        self.name = name
        self._clock = clock
        self._opened_at = 0.0
        self.opened_count = 0
        self.reset()

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
                    _log.info("worker %s: circuit closed again after %d successes", self.name, self._successes)
            return
        self._failures += 1
        if state == HALF_OPEN or (state == CLOSED and self._failures >= self.cfg.failure_threshold):
            self._open()

    def trial(self) -> None:
        """The worker answers again (a good health check): half-open now, not after open_duration_s."""
        if self._state == OPEN:
            self._state = HALF_OPEN
            self._successes = 0

    def _open(self) -> None:
        _log.warning("worker %s: circuit opened after %d failures; no requests for %.0f s", self.name,
                     self._failures, self.cfg.open_duration_s)
        self._state = OPEN
        self._opened_at = self._clock()
        self._successes = 0
        self.opened_count += 1

    def reset(self) -> None:
        """Closed, with no failure or success counted (as a new breaker starts)."""
        self._state = CLOSED
        self._failures = 0
        self._successes = 0


# -- retries ----------------------------------------------------------------------------------
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def breaker_failure(status: int) -> bool:
    """Does this answer count against the worker's circuit? (busy/timeouts do not)."""
    return status >= 500


def backoff_s(cfg: RetryConfig, retry_index: int, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    base = min(cfg.initial_backoff_s * cfg.multiplier ** retry_index, cfg.max_backoff_s)
    if cfg.jitter:
        base *= 1.0 + rng.uniform(-cfg.jitter, cfg.jitter)
    return max(0.0, base)


# -- concurrency limit ------------------------------------------------------------------------
class ConcurrencyLimiter:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout_s: float) -> None:
        self.max = max_concurrent
        self.queue_size = queue_size
        self.timeout = queue_timeout_s
        self.active = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap: (priority, arrival, slot)
        self._arrivals = itertools.count()
        self.rejected_full = 0
        self.rejected_timeout = 0

    @property
    def enabled(self) -> bool:
        return self.max > 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, priority: int = 0) -> None:
        if self.max <= 0:
            return
        if self.active < self.max and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue_size:
            self.rejected_full += 1
            raise RouterError(429, f"too many requests: {self.active} running and {len(self._waiters)} queued",
                              code="queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._arrivals), fut)
        heapq.heappush(self._waiters, entry)
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except (TimeoutError, asyncio.CancelledError) as exc:
            got_slot = fut.done() and not fut.cancelled()
            if not fut.done():
                fut.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            if got_slot:
                self.release()  # it was handed to us just as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                self.rejected_timeout += 1
                raise RouterError(408, f"request waited {self.timeout:g} s in the queue", code="queue_timeout") \
                    from None
            raise

    def release(self) -> None:
        if self.max <= 0:
            return
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1
