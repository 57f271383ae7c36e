"""A copy thread: runs the tiers' page copies off the engine step, in the order submitted.

Lifecycle of a job: the engine thread `submit`s it (everything the job touches is reserved
first: slots, pages, node locks); the thread runs `job.run()` (torch copies release the GIL;
storage calls block only this thread); the engine thread collects finished jobs with
`finished()` at its next poll and applies them to the radix tree. A job that raises is
finished with `error` set (its copy is treated as not done). `close` stops the thread after
the jobs already queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)


class Job:
    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run
        self.done = False
        self.error: BaseException | None = None
        self.finished_at = 0.0  # time.monotonic() when it finished (latency without the wait for a poll)


class Worker:
    def __init__(self, name: str) -> None:
        self._todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: deque[Job] = deque()
        self.pending = 0  # submitted, not yet collected (engine thread only)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.pending += 1
        self._todo.put(job)

    def finished(self) -> list[Job]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.pending -= len(out)
        return out

    def _loop(self) -> None:
        while (job := self._todo.get()) is not None:
            try:
                job.run()
            except BaseException as exc:  # noqa: BLE001 - reported to the engine thread
                log.exception("KV tier copy failed")
                job.error = exc
            job.finished_at = time.monotonic()
            job.done = True
            self._done.append(job)

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=30)
