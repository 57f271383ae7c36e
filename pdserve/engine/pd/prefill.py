"""Prefill stage of PD disaggregation: bootstrap queue → forward (chunked) → inflight queue.

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

A decode with a prefix cache (RoomInfo.decode_prefix_len, whole pages) reserved pages only
past its hit; this stage still computes the whole prompt (its own cache hit is independent)
and its send cursor starts at the decode's hit, so only later pages move. Same prompt, the
decode holding 8 tokens (2 pages):
    chunk 1 → full pages [0] ≤ cursor 2: nothing sent
    chunk 2 → last: pages[2:3] → send(src=pages[2:3], start_page=2) (the sender maps it to
              decode's first reserved page); a full hit sends no page but still the metadata
The record's cached_tokens is this prefill's own hit; the decode reports the larger of the two.

KV tiers (--enable-hierarchical-cache): `add` already asks the KV manager to prepare the prompt
(`kv.prepare`: a prefix in host memory is loaded, one in shared storage fetched), so the copy
overlaps the wait for the decode's page list; the scheduler admits it once its prefix is on the
device (per the prefetch policy), and it computes only the rest.
"""

from __future__ import annotations

import time

from pdserve.disagg import BootstrapServer, KVPoll, MetadataRecord, ServerRooms
from pdserve.engine.batch import Chunk
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import Bootstrap, TransferStats
from pdserve.engine.pd.stage import Finished, StagePoll
from pdserve.engine.pd.state import PrefillTransfer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import Scheduler


def _transfer(req: Request) -> PrefillTransfer:
    assert isinstance(req.transfer, PrefillTransfer)
    return req.transfer


class PrefillStage:
    def __init__(self, scheduler: Scheduler, page_size: int, manager: ServerRooms,
                 bootstrap: BootstrapServer | None, kv: KVManager | None = None) -> None:
        self.scheduler = scheduler
        self.kv = kv  # KV tiers: a prompt's prefix is fetched while it waits for its decode
        self.page_size = page_size
        self.manager = manager
        self.bootstrap_server = bootstrap  # None on dp ranks > 0 (dp rank 0 hosts it)
        self.bootstrap: list[Request] = []
        self.inflight: list[Request] = []
        self.stats: TransferStats | None = TransferStats()

    def pending(self) -> int:
        return len(self.bootstrap) + len(self.inflight)

    def add(self, req: Request, boot: Bootstrap) -> None:
        req.transfer = PrefillTransfer(self.manager.sender(boot.room), boot.room, time.monotonic())
        self.bootstrap.append(req)
        if self.kv is not None:
            self.kv.prepare(req)  # KV tiers: start bringing its prefix in now, overlapping the wait

    def live(self) -> list[Request]:
        return [*self.bootstrap, *self.inflight]

    def close(self) -> None:
        self.manager.close()
        if self.bootstrap_server is not None:
            self.bootstrap_server.close()

    def owns(self, req: Request) -> bool:
        """Every PD request, also while its prompt runs in the scheduler (its sends may be queued)."""
        return isinstance(req.transfer, PrefillTransfer)

    def abort(self, req: Request) -> None:
        t = _transfer(req)
        t.aborting = True
        t.sender.abort()  # tells decode (RoomFailed), so its request ends now, not at its timeout
        if self.scheduler.detach(req):  # queued or mid-prefill: stop computing it; it keeps its
            self.inflight.append(req)  # pages in the inflight queue until no queued send can read them
        # bootstrap or inflight queue: poll() answers it once the sender is terminal

    def poll(self) -> StagePoll:
        """Move bootstrapped requests to the scheduler; finish completed or failed transfers."""
        out = StagePoll()
        self._poll_bootstrap(out)
        for req in [r for r in self.scheduler.live() if isinstance(r.transfer, PrefillTransfer)]:
            if req.transfer.sender.poll() == KVPoll.Failed:  # decode died or gave up: stop computing
                self.scheduler.detach(req)  # the prompt, and answer with the failure (just below)
                self.inflight.append(req)
        for req in list(self.inflight):
            t = _transfer(req)
            state = t.sender.poll()
            if state not in (KVPoll.Success, KVPoll.Failed):
                continue
            self.inflight.remove(req)
            assert self.stats is not None
            moved = t.pages_sent - t.skip_pages  # the pages that really moved
            self.stats.record(state == KVPoll.Success, moved * self.manager.layout.model_page_bytes,
                              time.monotonic() - t.started)
            err = None if state == KVPoll.Success else f"KV transfer to the decode server failed: {t.sender.failure}"
            out.finished.append(self._end(req, t.error if t.error is not None else (None if t.aborting else err),
                                          aborted=t.aborting and t.error is None))
        return out

    def _poll_bootstrap(self, out: StagePoll) -> None:
        for req in list(self.bootstrap):
            t = _transfer(req)
            state = t.sender.poll()
            if state == KVPoll.Failed or t.aborting:
                self.bootstrap.remove(req)
                out.finished.append(self._end(req, None if t.aborting else f"bootstrap failed: {t.sender.failure}",
                                              aborted=t.aborting))
            elif state >= KVPoll.WaitingForInput:
                self.bootstrap.remove(req)
                want = pages_needed(req.prompt_len, self.page_size)
                prefix = t.sender.decode_prefix_len or 0
                t.skip_pages = t.pages_sent = prefix // self.page_size
                if prefix > req.prompt_len or (t.sender.num_dst_pages or 0) + t.skip_pages != want:
                    # decode got another prompt under this room
                    t.error = (f"decode reserved {t.sender.num_dst_pages} KV pages for room {t.room} past "
                               f"its {prefix} cached tokens, the prompt needs {want} pages: prefill and "
                               f"decode got different prompts")
                    t.sender.abort()
                    self.inflight.append(req)  # wait for the abort to settle, then answer
                    continue
                self.scheduler.add(req)

    def after_forward(self, chunks: list[Chunk]) -> set[Request]:
        """Push the pages each PD chunk completed; hand finished prompts to the inflight queue."""
        taken: set[Request] = set()
        for c in chunks:
            req = c.req
            t = req.transfer
            if not isinstance(t, PrefillTransfer):
                continue
            if c.end >= req.prompt_len:  # the prompt is done and its first token sampled
                last = pages_needed(req.prompt_len, self.page_size)
                t.sender.send(req.pages[t.pages_sent:last], t.pages_sent, True, self._record(req, t.room))
                t.pages_sent = last
                self.scheduler.detach(req)
                self.inflight.append(req)
                taken.add(req)
            else:
                full = req.num_computed // self.page_size
                if full > t.pages_sent:
                    t.sender.send(req.pages[t.pages_sent:full], t.pages_sent, False)
                    t.pages_sent = full
        return taken

    @staticmethod
    def _record(req: Request, room: int) -> MetadataRecord:
        top = [(x.token_id, x.logprob) for x in req.new_top[0]] if req.new_top else None
        return MetadataRecord(room=room, first_token=req.tokens[req.prompt_len],
                              logprob=req.new_logprobs[0] if req.new_logprobs else None,
                              top_logprobs=top, cached_tokens=req.cached_tokens)

    @staticmethod
    def _end(req: Request, error: str | None, aborted: bool = False) -> Finished:
        reason = "abort" if (error or aborted) else (req.finish_reason or "length")
        return Finished(req, reason, error)
