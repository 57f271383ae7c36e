"""Decode stage of PD disaggregation: prealloc queue → transfer queue → running batch.

    add ──▶ prealloc queue ── pages for the prompt fit (with decode headroom) ──▶ reserve them,
            receiver.init(pages) tells the prefill rank where to write ──▶ transfer queue
            ── receiver Success, record.room == room ──▶ commit the first token without a
               forward (num_computed = prompt_len; a seeded generator skips the draw the
               prefill made for it; the token goes through accept_token like a sampled one:
               a grammar's matcher advances past it), join the running batch, decode, stream
            └─ Failed / timeout / wrong record / unreachable prefill ──▶ policy
                 recompute (default): free the reserved pages (their bytes cannot be trusted),
                   hand the request to the scheduler as an ordinary prefill (it may reuse a
                   cached prefix and any free page), counted in stats.recomputed, logged once
                 error: answer a clean 503; pages back to the pool
A reserved page returns to the pool only once the receiver is terminal (Success or Failed):
a write into it may otherwise still land. Aborts wait for that too. A request that recomputes
is no longer the stage's: the engine runs, aborts and finishes it like a unified one.

Decode-side prefix cache (`--disaggregation-decode-enable-radix-cache`, off by default): finished
requests leave their prompt and output full pages in this engine's radix cache (as on a unified
engine). At prealloc the prompt is matched against it first: the hit (whole pages, up to every
full page of the prompt: the decode needs the KV of every prompt token and the prefill computes
the last token's logits anyway, so unlike a unified engine nothing has to be left to compute) is
locked for the request's life and becomes the head of its page table; pages are reserved only
for the rest, and the RoomInfo says `decode_prefix_len` = the hit in tokens. A full hit of a
page-aligned prompt reserves no page: only the metadata record (first token) comes. At commit
the prompt's full pages join the cache (concurrent turns sharing the prefix hit them too);
`cached_tokens` = max(prefill's own hit, the decode's hit): the prompt tokens some cache served,
each counted once (both hits are prefixes). A failed transfer frees only the reserved pages (the
cached prefix is this engine's own KV and stays cached); the recompute re-matches it. Off: no
match, the RoomInfo names every prompt page, exactly as without a decode cache.

KV tiers with a storage backend (--enable-hierarchical-cache --hicache-storage-backend): the
engine's KV manager writes every finished request's pages, prompt and reply, to the store
(whether or not the decode cache flag is on; its radix tree is the tiers' index either way), so
the next turn's prefill finds them; under write_through it also writes each page as it completes
(`after_forward` -> `kv.pages_completed`), so another decode continuing a migrated stream, or
this one recomputing a failed transfer, loads the prefix from the store instead of computing it.
"""

from __future__ import annotations

import logging
import time

from pdserve.disagg import BootstrapClient, KVPoll, MetadataRecord, ServerRooms, StaleEpoch
from pdserve.engine.accept import accept_token
from pdserve.engine.batch import Chunk
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import Bootstrap, TopLogprob, TransferStats
from pdserve.engine.pd.stage import Finished, StagePoll
from pdserve.engine.pd.state import DecodeTransfer
from pdserve.engine.request import Request
from pdserve.engine.sampler import skip_draw
from pdserve.engine.scheduler import Scheduler, rank
from pdserve.engine.stop import StopChecker

log = logging.getLogger(__name__)


def _transfer(req: Request) -> DecodeTransfer:
    assert isinstance(req.transfer, DecodeTransfer)
    return req.transfer


class DecodeStage:
    def __init__(self, scheduler: Scheduler, kv: KVManager, stops: StopChecker, vocab_size: int,
                 manager: ServerRooms, client: BootstrapClient, recompute: bool = True,
                 prefix_cache: bool = False) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.stops = stops
        self.vocab_size = vocab_size
        self.manager = manager
        self.client = client
        self.recompute = recompute
        self.prefix_cache = prefix_cache  # --disaggregation-decode-enable-radix-cache
        self.prealloc: list[Request] = []
        self.transfer: list[Request] = []
        self.stats: TransferStats | None = TransferStats()

    def pending(self) -> int:
        return len(self.prealloc) + len(self.transfer)

    def add(self, req: Request, boot: Bootstrap) -> None:
        req.transfer = DecodeTransfer(boot)
        self.prealloc.append(req)

    def live(self) -> list[Request]:
        return [*self.prealloc, *self.transfer]

    def close(self) -> None:
        self.manager.close()
        self.client.close()

    def owns(self, req: Request) -> bool:
        return req in self.prealloc or req in self.transfer

    def abort(self, req: Request) -> None:
        t = _transfer(req)
        t.aborting = True
        if t.receiver is not None:
            t.receiver.abort()

    def poll(self) -> StagePoll:
        out = StagePoll()
        self._poll_transfers(out)
        self._preallocate(out)
        return out

    def after_forward(self, chunks: list[Chunk]) -> set[Request]:
        """Nothing to push on the decode side: its requests run like any other once committed
        (KV tiers, write-through to storage: the pages they completed are written as they do)."""
        for c in chunks:
            self.kv.pages_completed(c.req)
        return set()

    def _preallocate(self, out: StagePoll) -> None:
        for req in [r for r in self.prealloc if _transfer(r).aborting]:  # anywhere in the queue
            self.prealloc.remove(req)
            out.finished.append(Finished(req, "abort", keep_in_cache=False))
        if self.scheduler.by_priority:
            self.prealloc.sort(key=rank)
        for req in list(self.prealloc):  # FCFS for pages (by priority: see engine/scheduler.py); a
            t = _transfer(req)  # prefill not yet reached blocks only its own
            fits = self._fits(req)
            while not fits and self.scheduler.make_room(req):  # priority scheduling: a less
                fits = self._fits(req)  # important running request went back to the queue
            if not fits:
                break
            try:  # non-blocking: the first contact with a prefill is fetched in the background
                routes = self.client.routes(t.boot.host, t.boot.port, t.boot.room, t.boot.epoch)
            except Exception as e:  # unreachable prefill, layout mismatch or another role epoch: recompute,
                self.prealloc.remove(req)  # or a clean error (409 for the epoch: the router tries another pair)
                self._failed(req, f"cannot use the prefill server: {e}", out, 409 if isinstance(e, StaleEpoch) else 503)
                continue
            if routes is None:
                self._unlock(req)
                continue  # still fetching its prefill's routes (up to fetch_timeout): serve the others
            if not self.kv.ensure_pages(req, req.prompt_len):  # `available` was an estimate (KV tiers: pages
                self._unlock(req)  # being copied cannot go yet): it waits, its room not yet opened
                break
            self.prealloc.remove(req)
            try:
                t.receiver = self.manager.open(t.boot.room, routes)
            except ValueError as e:  # another live request holds this room: refuse this one, keep serving
                out.finished.append(self._fail(req, f"bootstrap_room {t.boot.room} is taken: {e}", status=400))
                continue
            dst = req.pages[req.tree_pages: pages_needed(req.prompt_len, self.kv.page_size)]
            t.num_pages = len(dst)
            t.receiver.init(dst, t.decode_prefix_len)
            t.started = req.t_admitted = time.monotonic()  # its queue ends: KV on its way (traces)
            self.transfer.append(req)

    def _fits(self, req: Request) -> bool:
        """A running slot and pages for `req`'s prompt (with decode headroom); its cached prefix is
        locked first when it fits (its pages are then not evictable)."""
        t = _transfer(req)
        if self.scheduler.num_running + len(self.transfer) >= self.scheduler.max_running:
            return False
        if self.prefix_cache:
            t.decode_prefix_len = self.kv.lock_prefix(req, req.prompt_len)
        need = pages_needed(req.prompt_len + 1, self.kv.page_size) - len(req.pages) \
            + self.scheduler.decode_headroom_pages()
        if self.kv.available() < need:
            self._unlock(req)
            return False
        return True

    def _poll_transfers(self, out: StagePoll) -> None:
        for req in list(self.transfer):
            t = _transfer(req)
            assert t.receiver is not None
            state = t.receiver.poll()
            if state not in (KVPoll.Success, KVPoll.Failed):
                continue
            self.transfer.remove(req)
            num_bytes = t.num_pages * self.manager.layout.model_page_bytes  # what really moved
            assert self.stats is not None
            self.stats.record(state == KVPoll.Success, num_bytes, time.monotonic() - t.started)
            if t.aborting:
                out.finished.append(Finished(req, "abort", keep_in_cache=False))
            elif state == KVPoll.Failed:
                why = t.receiver.failure or "unknown"
                self._failed(req, f"KV transfer from the prefill server failed: {why}", out)
            else:
                record = t.receiver.metadata()
                if record is None or record.room != t.boot.room:
                    self._failed(req, "rejected a corrupted or wrong-room metadata record", out)
                elif not 0 <= record.first_token < self.vocab_size:
                    self._failed(req, "rejected a metadata record with an invalid token", out)
                else:
                    self._commit(req, record)
                    out.progressed.append(req)

    def _unlock(self, req: Request) -> None:
        """Undo the prealloc's prefix lock of a request that stays queued (it holds no other page)."""
        if req.tree_node is not None:
            self.kv.release(req, keep_in_cache=False)
        _transfer(req).decode_prefix_len = 0

    def _commit(self, req: Request, rec: MetadataRecord) -> None:
        """The prompt's KV is in place: take the first token as if this engine sampled it."""
        hit = _transfer(req).decode_prefix_len
        req.transfer = None
        req.t_first_token = time.monotonic()
        req.num_computed = req.prompt_len
        req.prompt_lp = req.prompt_top = None  # the prefill scored the prompt; the router merges its answer
        req.admitted = True
        req.cached_tokens = max(rec.cached_tokens, hit)  # both are prefixes: each cached token once
        if self.prefix_cache:  # the receiver is terminal: page ids may change (duplicates freed)
            self.kv.cache_prefix(req)
        skip_draw(req.params, req.generator, self.vocab_size)  # the prefill drew for this token
        top = None if rec.top_logprobs is None else [TopLogprob(int(i), float(lp)) for i, lp in rec.top_logprobs]
        # a grammar's matcher advances past it: the prefill sampled it under the same grammar
        if not accept_token(req, rec.first_token, rec.logprob, top, self.stops):
            self.scheduler.resume(req)

    def _failed(self, req: Request, error: str, out: StagePoll, status: int = 503) -> None:
        """A transfer that failed for good (the receiver is terminal: no write can land)."""
        if not self.recompute:
            out.finished.append(self._fail(req, error, status))
            return
        room = _transfer(req).boot.room
        log.warning("request %s (room %d): %s; recomputing the prompt locally", req.rid, room, error)
        self.kv.release(req, keep_in_cache=False)  # reserved pages back: their bytes are not trusted
        req.transfer = None
        req.num_computed = 0
        req.t_admitted = None  # not admitted yet: a deadline may still drop it (engine/deadlines.py)
        self.scheduler.add(req)  # an ordinary prefill from here on
        assert self.stats is not None
        self.stats.recomputed += 1

    @staticmethod
    def _fail(req: Request, error: str, status: int = 503) -> Finished:
        log.warning("request %s: %s", req.rid, error)
        return Finished(req, "abort", error, status, keep_in_cache=False)
