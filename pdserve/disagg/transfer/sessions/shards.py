"""Sharded transfer queues: `queue_size` FIFO queues, one consumer thread each.

Lifecycle: built by a prefill-side manager at start; `submit(destination, task)` from any thread
(never blocks); the consumer of shard `crc32(destination) % queue_size` runs tasks one by one
(FCFS per destination, so a room's chunks and its Done/RoomFailed go out in order, and only one
task per room runs at a time); `close()` stops the consumers after the task in hand.

Threads: queue_size consumers, plus per shard an executor of thread_pool_size // queue_size
threads when that is > 1, which a task may use to parallelise its own work (e.g. shm copies of
layer groups); with the defaults (4 // 4) tasks run inline on the consumer.
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("pdserve.disagg.shards")

Task = Callable[[ThreadPoolExecutor | None], None]


class ShardedQueues:
    def __init__(self, queue_size: int, thread_pool_size: int, name: str) -> None:
        self.queue_size = queue_size
        self._queues: list[queue.SimpleQueue[Task | None]] = [queue.SimpleQueue() for _ in range(queue_size)]
        per_shard = max(1, thread_pool_size // queue_size)
        self._executors: list[ThreadPoolExecutor | None] = [
            ThreadPoolExecutor(per_shard, thread_name_prefix=f"{name}-x{i}") if per_shard > 1 else None
            for i in range(queue_size)]
        self._threads = [threading.Thread(target=self._consume, args=(i,), name=f"{name}-q{i}", daemon=True)
                         for i in range(queue_size)]
        self._closed = False
        for t in self._threads:
            t.start()

    def shard_of(self, destination: str) -> int:
        return zlib.crc32(destination.encode()) % self.queue_size

    def submit(self, destination: str, task: Task) -> None:
        if self._closed:
            raise RuntimeError("transfer queues are closed")
        self._queues[self.shard_of(destination)].put(task)

    def _consume(self, i: int) -> None:
        q, executor = self._queues[i], self._executors[i]
        while True:
            task = q.get()
            if task is None:
                return
            try:
                task(executor)
            except Exception:  # tasks report their own failures; this is a bug guard
                logger.exception("transfer task crashed")

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the queued tasks (callers fail their rooms first, so those are quick)."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout)
        for ex in self._executors:
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
