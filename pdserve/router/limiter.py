"""Concurrency limit with a bounded FIFO queue (`--max-concurrent-requests`, `--queue-size`).

Lifecycle of a request: `acquire()` takes a slot at once if one is free; else it waits in the
queue (429 when the queue is full, 408 after `queue_timeout_s`); `release()` hands the slot
straight to the oldest waiter, so a queued request never races newcomers. Disabled when
`max_concurrent` is -1.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pdserve.router.request import RouterError


class ConcurrencyLimiter:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout_s: float) -> None:
        self.max = max_concurrent
        self.queue_size = queue_size
        self.timeout = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected_full = 0
        self.rejected_timeout = 0

    @property
    def enabled(self) -> bool:
        return self.max > 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
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
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except (TimeoutError, asyncio.CancelledError) as exc:
            got_slot = fut.done() and not fut.cancelled()
            if not fut.done():
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass
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
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1
