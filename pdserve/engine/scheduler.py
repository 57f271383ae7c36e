"""Continuous-batching scheduler composed of small managers.

Each `schedule()` builds one forward under a token budget:
  1. running requests, oldest first: a decode takes 1 token, an unfinished prefill its next
     chunk. If pages run out, the newest running request is preempted (its computed pages
     go to the prefix cache, it returns to the front of the waiting queue and recomputes).
  2. waiting requests, FCFS, while budget, `max_running` and pages allow: a request is
     admitted only if its whole remaining prompt fits with headroom kept for the decode of
     those already running (`decode_headroom` × their remaining new tokens). A copy of a
     prompt (n > 1) waits, without blocking the queue, until its leader's prompt is cached.

Priority scheduling (`--enable-priority-scheduling`; vLLM's and SGLang's `priority`, lower value
first): the waiting queue and the running batch are kept in (priority, arrival) order, so the
budget goes to the most important requests first and FCFS holds within a priority; the victim
of a preemption is the least important running request (the newest of its priority); a waiting
request that does not fit (`max_running` or pages) preempts running requests of a strictly
lower priority until it fits. A PD prefill's request is never preempted for priority: its pages
may be in flight to its decode. Off, every request has priority 0: plain FCFS, as above.
"""

from __future__ import annotations

import bisect
from collections import deque

from pdserve.engine.batch import Chunk, ScheduleBatch
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.request import Request


def rank(req: Request) -> tuple[int, int]:
    """Scheduling order under priority scheduling: priority (lower first), then arrival."""
    return req.priority, req.arrival


class WaitingQueue:
    """FCFS queue; preempted requests re-enter at the front. With `by_priority`, kept in `rank`
    order instead (a preempted request re-enters at the front of its priority)."""

    def __init__(self, by_priority: bool = False) -> None:
        self._q: deque[Request] = deque()
        self.by_priority = by_priority

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self):
        return iter(self._q)

    def push(self, req: Request) -> None:
        if self.by_priority and self._q and rank(req) < rank(self._q[-1]):
            self._q.insert(bisect.bisect(self._q, rank(req), key=rank), req)
        else:
            self._q.append(req)

    def push_front(self, req: Request) -> None:
        if self.by_priority:
            self.push(req)
        else:
            self._q.appendleft(req)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> bool:
        try:
            self._q.remove(req)
            return True
        except ValueError:
            return False


class Scheduler:
    def __init__(self, kv: KVManager, chunk_budget: int, max_running: int, decode_headroom: float,
                 by_priority: bool = False) -> None:
        self.kv = kv
        self.chunk_budget = chunk_budget
        self.max_running = max_running
        self.decode_headroom = decode_headroom
        self.by_priority = by_priority  # --enable-priority-scheduling (see the module docstring)
        self.waiting = WaitingQueue(by_priority)
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.push(req)

    def resume(self, req: Request) -> None:
        """Join the running batch directly: its KV is already in its pages (a PD decode commit)."""
        self._run(req)

    def _run(self, req: Request) -> None:
        if self.by_priority and self.running and rank(req) < rank(self.running[-1]):
            self.running.insert(bisect.bisect(self.running, rank(req), key=rank), req)
        else:
            self.running.append(req)

    def detach(self, req: Request) -> bool:
        """Take `req` out of the scheduler keeping its pages (a PD stage holds it from now on);
        False if it was not here."""
        if req in self.running:
            self.running.remove(req)
            return True
        return self.waiting.remove(req)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def schedule(self) -> ScheduleBatch | None:
        chunks: list[Chunk] = []
        if self.by_priority and self.waiting and self.running:
            self._preempt_for_priority()
            self._admit_waiting(chunks, self.chunk_budget, outranking=True)  # they go first below
        budget = self._schedule_running(chunks, self.chunk_budget)
        self._admit_waiting(chunks, budget)
        return ScheduleBatch(chunks) if chunks else None

    def _schedule_running(self, chunks: list[Chunk], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.todo, budget)
            while req in self.running and not self.kv.ensure_pages(req, req.num_computed + n):
                self.preempt(self.running[-1])  # after req in the batch order: it has no chunk yet
            if req not in self.running:
                break  # it preempted itself: everything after it went too
            chunks.append(Chunk(req, req.num_computed, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, chunks: list[Chunk], budget: int, outranking: bool = False) -> None:
        """Admit waiting requests in order while budget, `max_running` and pages allow (module
        docstring), each with its first chunk. `outranking` (priority scheduling, before the
        running requests are scheduled): only those more important than the least important
        running request, with no chunk yet: they join the batch in their rank's place."""
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if outranking and rank(req) >= rank(self.running[-1]):
                break
            if self._waits_for_leader(req):
                continue  # admitted once its leader's prompt pages are in the prefix cache
            req.leader = None
            self.kv.attach_prefix(req)
            need = pages_needed(len(req.tokens), self.kv.page_size) - len(req.pages) + self.decode_headroom_pages()
            n = min(req.todo, budget)
            if self.kv.available() < need or not self.kv.ensure_pages(req, req.num_computed + n):
                self.kv.release(req, keep_in_cache=False)
                req.num_computed = 0
                break
            self.waiting.remove(req)
            if not req.admitted:
                req.cached_tokens, req.admitted = req.num_computed, True
            self._run(req)
            if not outranking:
                chunks.append(Chunk(req, req.num_computed, n))
                budget -= n

    def _preempt_for_priority(self) -> None:
        """Before the step is built: waiting requests more important than the least important
        running one take its place (preempt it) while they would not fit otherwise (`max_running`,
        or pages for their whole prompt with headroom, the prefix hit not counted)."""
        for req in list(self.waiting):
            while True:
                need = pages_needed(len(req.tokens), self.kv.page_size) + self.decode_headroom_pages()
                if len(self.running) < self.max_running and self.kv.available() >= need:
                    break  # it fits: the next one may need room
                if not self.make_room(req):
                    return  # nothing it may preempt: the rest of the queue is no more important

    def make_room(self, req: Request) -> bool:
        """Priority scheduling: preempt the least important running request if `req` is strictly
        more important and it is not a PD prefill's; True if one was preempted."""
        victim = self.running[-1] if self.by_priority and self.running else None
        if victim is None or victim.priority <= req.priority or victim.transfer is not None:
            return False
        self.preempt(victim)
        return True

    def _waits_for_leader(self, req: Request) -> bool:
        """n copies of one prompt: the first computes it, the others wait until it has sampled
        (its full prompt pages are cached then) and compute only the last partial page. A leader
        outside the scheduler (a PD stage's queue, finished) holds nobody back."""
        lead = req.leader
        if lead is None or lead.finished:
            return False
        if lead in self.running:
            return lead.num_computed < lead.prompt_len
        return lead in self.waiting

    def decode_headroom_pages(self) -> int:
        tokens = sum(r.remaining_new for r in self.running)
        return pages_needed(int(tokens * self.decode_headroom), self.kv.page_size)

    def preempt(self, req: Request) -> None:
        """Recompute later: pages go to the prefix cache, the request to the queue front."""
        self.running.remove(req)
        self.kv.release(req, keep_in_cache=True)
        req.num_computed = 0
        self.waiting.push_front(req)
        self.num_preemptions += 1

    def finish(self, req: Request, keep_in_cache: bool = True) -> None:
        self.detach(req)
        self.kv.release(req, keep_in_cache=keep_in_cache)

    def live(self) -> list[Request]:
        return [*self.running, *self.waiting]
