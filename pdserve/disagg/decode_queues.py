"""Decode side of PD disaggregation: prealloc queue → transfer queue → running batch.

    add ──▶ prealloc queue ── pages for the prompt fit (with decode headroom) ──▶ reserve them,
            receiver.init(pages) tells the prefill rank where to write ──▶ transfer queue
            ── receiver Success, record.room == room ──▶ commit the first token without a
               forward (num_computed = prompt_len), join the running batch, decode, stream
            └─ Failed / timeout / wrong record ──▶ answer: error; pages back to the pool
A reserved page returns to the pool only once the receiver is terminal (Success or Failed):
a write into it may otherwise still land. Aborts wait for that too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.disagg.bootstrap import BootstrapClient
from pdserve.disagg.messages import MetadataRecord
from pdserve.disagg.transfer.base import KVPoll, KVReceiver, TransferManager
from pdserve.engine.io import Bootstrap, TokenOut, TopLogprob, TransferStats
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.request import Request

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeTransfer:
    boot: Bootstrap
    receiver: KVReceiver | None = None
    started: float = 0.0  # receiver.init time
    aborting: bool = False
    error: str | None = None


class DecodeQueues:
    def __init__(self, engine: "Engine", manager: TransferManager, client: BootstrapClient) -> None:
        self.engine = engine
        self.manager = manager
        self.client = client
        self.prealloc: list[Request] = []
        self.transfer: list[Request] = []
        self.stats = TransferStats()

    def __len__(self) -> int:
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
        t: DecodeTransfer = req.transfer
        t.aborting = True
        if t.receiver is not None:
            t.receiver.abort()

    def poll(self) -> list[TokenOut]:
        out = self._poll_transfers()
        out += self._preallocate()
        return out

    def after_forward(self, chunks: list) -> set[Request]:
        """Nothing to push on the decode side: its requests run like any other once committed."""
        return set()

    def _preallocate(self) -> list[TokenOut]:
        out: list[TokenOut] = []
        eng, kv = self.engine, self.engine.kv
        for req in [r for r in self.prealloc if r.transfer.aborting]:  # anywhere in the queue
            self.prealloc.remove(req)
            out.append(eng.finish_request(req, "abort", keep_in_cache=False))
        for req in list(self.prealloc):  # FCFS for pages; a prefill not yet reached blocks only its own
            t: DecodeTransfer = req.transfer
            if len(eng.scheduler.running) + len(self.transfer) >= eng.config.max_running:
                break
            need = pages_needed(req.prompt_len + 1, kv.page_size) + eng.scheduler.decode_headroom_pages()
            if kv.available() < need:
                break
            try:  # non-blocking: the first contact with a prefill is fetched in the background
                route = self.client.poll_route(t.boot.host, t.boot.port)
            except Exception as e:  # unreachable prefill or layout mismatch: a clean error
                self.prealloc.remove(req)
                out.append(self._fail(req, str(e)))
                continue
            if route is None:
                continue  # still fetching its prefill's route (up to fetch_timeout): serve the others
            self.prealloc.remove(req)
            try:
                t.receiver = self.manager.receiver(t.boot.room, route.endpoint)
            except ValueError as e:  # another live request holds this room: refuse this one, keep serving
                out.append(self._fail(req, f"bootstrap_room {t.boot.room} is taken: {e}"))
                out[-1].error_status = 400
                continue
            kv.ensure_pages(req, req.prompt_len)
            t.receiver.init(req.pages[: pages_needed(req.prompt_len, kv.page_size)])
            t.started = time.monotonic()
            self.transfer.append(req)
        return out

    def _poll_transfers(self) -> list[TokenOut]:
        out: list[TokenOut] = []
        for req in list(self.transfer):
            t: DecodeTransfer = req.transfer
            assert t.receiver is not None
            state = t.receiver.poll()
            if state not in (KVPoll.Success, KVPoll.Failed):
                continue
            self.transfer.remove(req)
            num_bytes = pages_needed(req.prompt_len, self.engine.kv.page_size) * self.manager.layout.page_bytes
            self.stats.record(state == KVPoll.Success, num_bytes, time.monotonic() - t.started)
            if t.aborting:
                out.append(self.engine.finish_request(req, "abort", keep_in_cache=False))
            elif state == KVPoll.Failed:
                why = t.receiver.failure or "unknown"
                out.append(self._fail(req, f"KV transfer from the prefill server failed: {why}"))
            else:
                record = t.receiver.metadata()
                if record is None or record.room != t.boot.room:
                    out.append(self._fail(req, "rejected a corrupted or wrong-room metadata record"))
                elif not 0 <= record.first_token < self.engine.model_config.vocab_size:
                    out.append(self._fail(req, "rejected a metadata record with an invalid token"))
                else:
                    out.extend(self._commit(req, record))
        return out

    def _commit(self, req: Request, rec: MetadataRecord) -> list[TokenOut]:
        """The prompt's KV is in place: take the first token as if this engine sampled it."""
        eng = self.engine
        req.transfer = None
        req.num_computed = req.prompt_len
        req.admitted = True
        req.cached_tokens = rec.cached_tokens
        req.tokens.append(rec.first_token)
        req.new_ids.append(rec.first_token)
        if rec.logprob is not None:
            req.new_logprobs.append(rec.logprob)
        if rec.top_logprobs is not None:
            req.new_top.append([TopLogprob(int(i), float(lp)) for i, lp in rec.top_logprobs])
        eng.stops.check(req)
        if req.finished:
            return [eng.finish_request(req, req.finish_reason or "stop")]
        eng.scheduler.running.append(req)
        return [eng.take_output(req)]

    def _fail(self, req: Request, error: str) -> TokenOut:
        log.warning("request %s: %s", req.rid, error)
        out = self.engine.finish_request(req, "abort", keep_in_cache=False)
        out.error, out.error_status = error, 503
        return out
