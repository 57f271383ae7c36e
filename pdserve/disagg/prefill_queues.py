"""Prefill side of PD disaggregation: bootstrap queue → forward (chunked) → inflight queue.

    add ──▶ bootstrap queue ── decode's page list arrived (sender ≥ WaitingForInput) ──▶
            scheduler (waiting → running; chunked prefill as usual)
            after each chunk: push the full pages computed so far
            ┌──────── prompt done (first token sampled) ────────┐
            │ push the rest (incl. the partial last page) and the │
            │ metadata record; leave the running batch            │
            └──────────────────────▶ inflight queue ── sender Success ──▶ answer: 1 token
                                                     └─ Failed ─▶ answer: error
Pages are released (computed full pages to the prefix cache) only when the sender reaches a
terminal state, so no queued send ever reads a page that was freed and reused.

Page push arithmetic (page_size 4, prompt 10 tokens, chunks of 6 and 4):
    chunk 1 computes tokens 0..5 → full pages [0] → send(src=[pages[0]], start_page=0)
    chunk 2 computes tokens 6..9 → last: pages[1:3] → send(src=pages[1:3], start_page=1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.disagg.bootstrap import BootstrapServer
from pdserve.disagg.messages import MetadataRecord
from pdserve.disagg.transfer.base import KVPoll, KVSender, TransferManager
from pdserve.engine.batch import Chunk
from pdserve.engine.io import Bootstrap, TokenOut, TransferStats
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.request import Request

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


@dataclass(eq=False)
class PrefillTransfer:
    sender: KVSender
    room: int
    started: float = 0.0
    pages_sent: int = 0
    aborting: bool = False
    error: str | None = None  # why prefill itself gave the room up (answered once it is terminal)


class PrefillQueues:
    def __init__(self, engine: "Engine", manager: TransferManager, bootstrap: BootstrapServer) -> None:
        self.engine = engine
        self.manager = manager
        self.bootstrap_server = bootstrap
        self.bootstrap: list[Request] = []
        self.stats = TransferStats()
        self.inflight: list[Request] = []

    def __len__(self) -> int:
        return len(self.bootstrap) + len(self.inflight)

    def add(self, req: Request, boot: Bootstrap) -> None:
        req.transfer = PrefillTransfer(self.manager.sender(boot.room), boot.room, time.monotonic())
        self.bootstrap.append(req)

    def live(self) -> list[Request]:
        return [*self.bootstrap, *self.inflight]

    def close(self) -> None:
        self.manager.close()
        self.bootstrap_server.close()

    def owns(self, req: Request) -> bool:
        """Every PD request, also while its prompt runs in the scheduler (its sends may be queued)."""
        return isinstance(req.transfer, PrefillTransfer)

    def abort(self, req: Request) -> None:
        t: PrefillTransfer = req.transfer
        t.aborting = True
        t.sender.abort()  # tells decode (RoomFailed), so its request ends now, not at its timeout
        sched = self.engine.scheduler
        if req in sched.running:  # mid-prefill: stop computing it; it keeps its pages in the
            sched.running.remove(req)  # inflight queue until no queued send can read them
        elif not sched.waiting.remove(req):
            return  # bootstrap or inflight queue: poll() answers it once the sender is terminal
        self.inflight.append(req)

    def poll(self) -> list[TokenOut]:
        """Move bootstrapped requests to the scheduler; finish completed or failed transfers."""
        out: list[TokenOut] = []
        for req in list(self.bootstrap):
            t: PrefillTransfer = req.transfer
            state = t.sender.poll()
            if state == KVPoll.Failed or t.aborting:
                self.bootstrap.remove(req)
                out.append(self._end(req, None if t.aborting else f"bootstrap failed: {t.sender.failure}",
                                     aborted=t.aborting))
            elif state >= KVPoll.WaitingForInput:
                self.bootstrap.remove(req)
                want = pages_needed(req.prompt_len, self.engine.kv.page_size)
                if t.sender.num_dst_pages != want:  # decode got another prompt under this room
                    t.error = (f"decode reserved {t.sender.num_dst_pages} KV pages for room {t.room}, "
                               f"the prompt needs {want}: prefill and decode got different prompts")
                    t.sender.abort()
                    self.inflight.append(req)  # wait for the abort to settle, then answer
                    continue
                self.engine.scheduler.add(req)
        sched = self.engine.scheduler
        for req in [r for r in sched.live() if isinstance(r.transfer, PrefillTransfer)]:
            if req.transfer.sender.poll() == KVPoll.Failed:  # decode died or gave up: stop computing
                if req in sched.running:  # the prompt, and answer with the failure (just below)
                    sched.running.remove(req)
                else:
                    sched.waiting.remove(req)
                self.inflight.append(req)
        for req in list(self.inflight):
            t = req.transfer
            state = t.sender.poll()
            if state in (KVPoll.Success, KVPoll.Failed):
                self.inflight.remove(req)
                self.stats.record(state == KVPoll.Success, t.pages_sent * self.manager.layout.page_bytes,
                                  time.monotonic() - t.started)
                err = None if state == KVPoll.Success else f"KV transfer to the decode server failed: {t.sender.failure}"
                if t.error is not None:
                    out.append(self._end(req, t.error))
                else:
                    out.append(self._end(req, None if t.aborting else err, aborted=t.aborting))
        return out

    def after_forward(self, chunks: list[Chunk]) -> set[Request]:
        """Push the pages each PD chunk completed; hand finished prompts to the inflight queue."""
        taken: set[Request] = set()
        ps = self.engine.kv.page_size
        for c in chunks:
            req = c.req
            t: PrefillTransfer | None = req.transfer
            if t is None:
                continue
            if c.end >= req.prompt_len:  # the prompt is done and its first token sampled
                last = pages_needed(req.prompt_len, ps)
                t.sender.send(req.pages[t.pages_sent:last], t.pages_sent, True, self._record(req, t.room))
                t.pages_sent = last
                self.engine.scheduler.running.remove(req)
                self.inflight.append(req)
                taken.add(req)
            else:
                full = req.num_computed // ps
                if full > t.pages_sent:
                    t.sender.send(req.pages[t.pages_sent:full], t.pages_sent, False)
                    t.pages_sent = full
        return taken

    def _record(self, req: Request, room: int) -> MetadataRecord:
        top = [(x.token_id, x.logprob) for x in req.new_top[0]] if req.new_top else None
        return MetadataRecord(room=room, first_token=req.tokens[req.prompt_len],
                              logprob=req.new_logprobs[0] if req.new_logprobs else None,
                              top_logprobs=top, cached_tokens=req.cached_tokens)

    def _end(self, req: Request, error: str | None, aborted: bool = False) -> TokenOut:
        reason = "abort" if (error or aborted) else (req.finish_reason or "length")
        out = self.engine.finish_request(req, reason, keep_in_cache=True)
        out.error, out.error_status = error, 503
        return out
