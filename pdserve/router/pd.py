"""PD mode: pair a prefill with a decode per request and run both legs at once.

Per attempt:
  1. the decode policy picks among routable decodes (ones that failed this request are
     skipped while others remain); `decide` may then send the request to that decode alone
     (conditional disaggregation, below: an ordinary single-worker attempt); otherwise the
     prefill policy picks a prefill the same way;
  2. the body gets `bootstrap_host`/`bootstrap_port` of the chosen prefill and a random
     63-bit `bootstrap_room` (lists of them, one per sequence = prompts x n, for batches and
     n > 1, SGLang's batched form), and the prefill's role epoch when known (BOOTSTRAP_EPOCH:
     the decode names it in its route lookup);
  3. the same body goes to both workers concurrently, each leg with the role epoch of the
     worker it goes to when known (contract.EPOCH: a worker at another epoch answers 409
     stale_epoch, which is retried on a new pair and takes the worker out until its
     /server_info is read again); the prefill's answer is read whole in its own task; the
     decode's head and first body bytes are awaited in another;
  4. whichever leg fails first (connection error or an error status) cancels the other at
     once — closing its connection, which makes that worker abort the room and free its KV
     pages — and the attempt fails (retried on a new pair, with backoff, if nothing reached
     the client yet);
  5. the decode's answer is relayed (streamed unbuffered), with the prefill's input logprobs
     merged in front when `return_logprob` is set.
A client error (a 4xx but 408/429 and a 409 stale_epoch) from either leg, whichever answers first, decides the
request: that answer is relayed as is (status and body), nothing is retried (the same body
fails on any pair) and no leg counts as failed (`router_pd_client_errors_total{leg,status}`
counts it; the worker's circuit is untouched). The other leg is cancelled at once, in
whatever state it is: a leg already sent sees its connection close and its worker aborts the
room; a leg not yet written is never sent (the router does not send a leg only to cancel
it), so a worker may never see a request its peer refused.
A prefill failure after the decode started answering cannot hurt the answer and is only
counted; one before it keeps the decode leg when that decode recomputes failed transfers
(`recomputes`): it then runs the prompt itself, so the client sees no error (not when the
prefill refused it because it drains: a new pair is quicker than the decode's transfer
timeout). A decode stream that breaks after bytes reached the client migrates (migrate.py) to
another decode. A client that goes away in any phase (before the decode answers or mid-stream)
cancels both legs at once, so neither worker keeps the room until its bootstrap timeout. A
non-streaming request's decode streams its progress to the router (router/whole.py), so a decode
that dies mid-way is continued on another one too; the client gets one answer. Metrics: PD TTFT
(start → first decode byte) and failed legs by reason.

Conditional disaggregation (`decide`, before a prefill is picked; off unless a flag is set): a
single-prompt request goes to the chosen decode alone, without bootstrap fields (the decode then
prefills locally, as it does for a migrated stream) when its uncached part on that decode —
prompt tokens minus the decode's page-aligned prefix hit from the exact KV index
(router/kv_index.py; pages it can fetch from its KV tiers' shared store included; 0 for a
decode that publishes no events) — is at most
`--pd-local-prefill-threshold` tokens ("local_threshold"), or when every routable prefill's
queue (max of its polled /get_load and this router's in-flight count) is over
`--pd-prefill-queue-limit` ("local_queue"); otherwise "remote". Each decision is counted in
`<prefix>_router_pd_decisions_total{decision}`.

Prompt logprobs: the prefill computed the prompt, the decode did not, so a `/generate` with
`return_logprob: true` or a completion with `echo` + `logprobs` gets the prompt's logprobs from
the prefill's answer (`prompt_logprobs.py`: JSON bodies, batches and SSE streams).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import msgspec

from pdserve.contract import (BOOTSTRAP_EPOCH, BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM, DRAINING, EPOCH,
                              STREAM_IDS, error_code_is, sequence_count)
from pdserve.router.admission import deadline_left_s, with_deadline_left
from pdserve.router.config import RouterConfig
from pdserve.router.forward import Failure, RegularForwarder, note_stale, relay_stream
from pdserve.router.http.client import UpstreamError, UpstreamPool, UpstreamResponse
from pdserve.router.http.protocol import Response
from pdserve.router.metrics import RouterMetrics
from pdserve.router.migrate import StreamTracker, migratable, migrate, progress_tracked
from pdserve.router.kv_index import KVIndex
from pdserve.router.policies import Policy
from pdserve.router.prompt_ids import exact_hits, prompt_ids
from pdserve.router.prompt_logprobs import SSEMerger, merge_body, prefill_metas, wants_prompt_logprobs
from pdserve.router.request import RequestCtx, RouterError
from pdserve.router.resilience import backoff_s, breaker_failure
from pdserve.router.usage import Usage
from pdserve.router.whole import Write, answer_whole
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("pdserve.router")
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
_rand = random.SystemRandom()
Leg = tuple[int, bytes, "str | None", "str | None"]  # status, body, content type, retry-after


def batch_size(body: dict[str, Any]) -> int | None:
    """How many bootstrap rooms the request needs: one per sequence, prompts x n (None: one)."""
    n = body.get("n")
    if "sampling_params" in body and isinstance(body["sampling_params"], dict):
        n = body["sampling_params"].get("n", n)  # /generate carries n in its sampling_params
    copies = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    prompts = None
    for key in ("prompt", "text"):
        value = body.get(key)
        if isinstance(value, list):
            if not value:
                raise RouterError(400, f"'{key}' is an empty list", param=key)
            if isinstance(value[0], (str, list)):
                prompts = len(value)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        prompts = len(ids)
    if prompts is None and copies == 1:
        return None
    return sequence_count(prompts or 1, copies)


def inject_bootstrap(body: dict[str, Any], prefill: Worker, batch: int | None, track: bool = False) -> bytes:
    host, port = prefill.bootstrap_host, prefill.bootstrap_port
    if batch is None:
        extra: dict[str, Any] = {BOOTSTRAP_HOST: host, BOOTSTRAP_PORT: port, BOOTSTRAP_ROOM: _rand.getrandbits(63)}
    else:
        extra = {BOOTSTRAP_HOST: [host] * batch, BOOTSTRAP_PORT: [port] * batch,
                 BOOTSTRAP_ROOM: [_rand.getrandbits(63) for _ in range(batch)]}
    if track:  # the decode tells the ids of each event (a stream that may migrate: migrate.py)
        extra[STREAM_IDS] = True
    if prefill.epoch is not None:
        extra[BOOTSTRAP_EPOCH] = prefill.epoch
    merged = {**body, **extra}
    merged.pop(EPOCH, None)  # each leg gets its own worker's (with_epoch)
    return _enc.encode(merged)


def with_epoch(payload: bytes, w: Worker) -> bytes:
    """The leg of `payload` (a JSON object) for `w`: with `w`'s role epoch when known."""
    return payload if w.epoch is None else payload[:-1] + b',"%s":%d}' % (EPOCH.encode(), w.epoch)


def recomputes(d: Worker, p_task: asyncio.Task[Any], fail: Failure) -> bool:
    """Keep the decode leg after the prefill leg failed? Yes when the prefill failed after it
    got the request (not a refused connection: then a new pair is quicker) with a 5xx or a
    broken connection, and the decode says (/server_info) it recomputes a failed transfer."""
    exc = p_task.exception()
    if fail.status < 500 or fail.retry_after is not None or (isinstance(exc, UpstreamError) and exc.kind == "connect"):
        return False  # (an admission refusal: the prefill never took the room)
    if error_code_is(fail.body, DRAINING):
        return False
    return d.info is not None and d.info.recomputes


def _release_late(task: asyncio.Task[Any]) -> None:
    """A decode leg that finished after we gave up on it: drop its connection."""
    if not task.cancelled() and task.exception() is None:
        task.result()[0].release()


class PDForwarder:
    def __init__(self, cfg: RouterConfig, registry: WorkerRegistry, pool: UpstreamPool, prefill_policy: Policy,
                 decode_policy: Policy, metrics: RouterMetrics, index: KVIndex | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.local = RegularForwarder(cfg, registry, pool, decode_policy, metrics, role="decode")  # decode alone
        self.registry = registry
        self.pool = pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.metrics = metrics
        self.timeout = cfg.limits.request_timeout_s

    async def handle(self, ctx: RequestCtx) -> Response | None:
        body = ctx.json()
        batch = batch_size(body)
        want_lp = wants_prompt_logprobs(body)
        track = migratable(body, self.cfg.migration_limit, ctx.route) \
            or progress_tracked(body, self.cfg.migration_limit, ctx.route)
        tried_p: set[str] = set()
        tried_d: set[str] = set()
        last: Failure | None = None
        for attempt in range(self.cfg.retry.max_attempts):
            if attempt:
                self.metrics.retry(ctx.route)
                await asyncio.sleep(backoff_s(self.cfg.retry, attempt - 1))
            ctx.mark()
            prefills = self.registry.routable("prefill")
            decodes = self.registry.routable("decode")
            if not prefills or not decodes:
                break
            d_cands = [w for w in decodes if w.url not in tried_d] or decodes
            d = self.decode_policy.select(d_cands, ctx.text, await exact_hits(
                ctx, self.decode_policy, self.index, d_cands, self.pool, self.timeout))
            decision = await self.decide(ctx, d, prefills, batch, want_lp)
            self.metrics.pd_decision(decision)
            if decision != "remote":
                ctx.picked()
                local = await self.local.attempt(ctx, d)
                if not isinstance(local, Failure):
                    return local
                last = local
                tried_d.add(d.url)
                if local.gives_up(self.registry, "decode", tried_d):
                    break
                continue
            p_cands = [w for w in prefills if w.url not in tried_p] or prefills
            p = self.prefill_policy.select(p_cands, ctx.text, await exact_hits(
                ctx, self.prefill_policy, self.index, p_cands, self.pool, self.timeout))
            ctx.picked()
            sent = with_deadline_left(body, deadline_left_s(body, ctx.t0))  # what is left of its deadline
            outcome, blame = await self.pair(ctx, inject_bootstrap(sent, p, batch, track), p, d, want_lp, track)
            if not isinstance(outcome, Failure):
                return outcome
            last = outcome
            tried = tried_p if blame == "prefill" else tried_d
            tried.add(p.url if blame == "prefill" else d.url)
            if outcome.gives_up(self.registry, blame or "decode", tried):
                break
        if last is None:
            raise RouterError(503, "no healthy prefill/decode pair is available", code="no_healthy_workers")
        return None if last.sent else last.response(ctx)

    async def decide(self, ctx: RequestCtx, d: Worker, prefills: list[Worker], batch: int | None,
                     want_lp: bool) -> str:
        """"remote", "local_threshold" or "local_queue" (see the module docstring)."""
        cfg = self.cfg
        if batch is not None or want_lp:  # several sequences, or prompt logprobs: the prefill's job
            return "remote"
        if cfg.pd_local_prefill_threshold is not None:
            ids = await prompt_ids(ctx, d, self.pool, self.timeout)
            if ids:
                # pages the decode can fetch from its store count whole: it computes only the rest
                hit = self.index.hits([d.url], ids, store_weight=1.0).get(d.url, 0) if self.index is not None else 0
                if len(ids) - hit <= cfg.pd_local_prefill_threshold:
                    return "local_threshold"
        limit = cfg.pd_prefill_queue_limit
        if limit is not None and prefills and all(max(p.load, p.in_flight) > limit for p in prefills):
            return "local_queue"
        return "remote"

    async def _prefill(self, ctx: RequestCtx, p: Worker, payload: bytes) -> Leg:
        resp = await self.pool.request(p.host, p.port, "POST", ctx.req.target, p.fwd_headers + ctx.fwd_headers,
                                       with_epoch(payload, p), self.timeout)
        try:
            return resp.status, await resp.read(), resp.content_type, resp.headers.get("retry-after")
        finally:
            resp.release()

    async def _decode(self, ctx: RequestCtx, d: Worker, payload: bytes) -> tuple[UpstreamResponse, bytes | None, bool]:
        """The decode's response with its first bytes (all of them for a whole answer)."""
        resp = await self.pool.request(d.host, d.port, "POST", ctx.req.target, d.fwd_headers + ctx.fwd_headers,
                                       with_epoch(payload, d), self.timeout)
        try:
            if resp.buffered or resp.status >= 400:
                return resp, await resp.read(), True
            return resp, await resp.next_chunk(), False
        except BaseException:
            resp.release()
            raise

    def _prefill_done(self, task: asyncio.Task[Leg], p: Worker) -> None:
        p.in_flight -= 1
        p.processed += 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            p.record(False, str(exc))
            self.metrics.pd_failure("prefill", getattr(exc, "kind", "error"))
            return
        status, body, _, _ = task.result()
        if status >= 400:
            note_stale(p, status, body)
            p.record(not breaker_failure(status), f"answered {status}")
            self.metrics.pd_answer("prefill", status)
        else:
            p.record(True)

    async def _migrate(self, ctx: RequestCtx, tracker: StreamTracker, d: Worker, exc: UpstreamError,
                       write: Write | None = None) -> bool:
        """The decode's stream broke mid-way: continue it on another decode (local prefill)."""
        d.record(False, str(exc))
        ok = await migrate(ctx, ctx.json(), tracker, {d.url}, self.registry, "decode", self.decode_policy,
                           self.pool, self.cfg.migration_limit, self.timeout, write=write)
        self.metrics.migrations.labels("ok" if ok else "failed").inc()
        return ok

    @staticmethod
    def _prefill_failure(task: asyncio.Task[Leg], p: Worker) -> Failure | None:
        exc = task.exception()
        if isinstance(exc, UpstreamError):
            return Failure.upstream(exc, f"prefill {p.url}")
        if exc is not None:
            raise exc
        status, body, ctype, retry_after = task.result()
        return Failure.answer(status, body, ctype, retry_after) if status >= 400 else None

    async def pair(self, ctx: RequestCtx, payload: bytes, p: Worker, d: Worker, want_lp: bool,
                   track: bool = False) -> tuple[Response | Failure | None, str | None]:
        loop = asyncio.get_running_loop()
        p.in_flight += 1
        d.in_flight += 1
        p_task = loop.create_task(self._prefill(ctx, p, payload))
        p_task.add_done_callback(lambda t: self._prefill_done(t, p))
        d_task = loop.create_task(self._decode(ctx, d, payload))
        resp: UpstreamResponse | None = None
        ok = False  # on success the prefill leg may finish in the background; otherwise it is cancelled
        try:
            done, _ = await asyncio.wait((p_task, d_task), return_when=asyncio.FIRST_COMPLETED)
            blame = "decode"
            if p_task in done and (fail := self._prefill_failure(p_task, p)) is not None:
                if not recomputes(d, p_task, fail):
                    return fail, "prefill"  # `finally` cancels the decode leg now
                blame = "prefill"  # the decode runs the prompt itself once its transfer fails
            try:
                resp, first, complete = await d_task
            except UpstreamError as exc:
                d.record(False, str(exc))
                self.metrics.pd_failure("decode", exc.kind)
                return Failure.upstream(exc, f"decode {d.url}"), blame
            status = resp.status
            if status >= 400:
                note_stale(d, status, first or b"")
                d.record(not breaker_failure(status), f"answered {status}")
                self.metrics.pd_answer("decode", status)
                return Failure.answer(status, first or b"", resp.content_type, resp.headers.get("retry-after")), blame
            d.record(True)
            self.metrics.pd_ttft.observe(time.perf_counter() - ctx.t0)
            metas: list[dict[str, Any]] = []
            if want_lp:
                try:
                    p_status, p_body, p_ctype, _ = await p_task
                    if p_status < 400:
                        metas = prefill_metas(p_body, p_ctype)
                except UpstreamError:
                    pass  # the decode has its KV already; answer without the prompt logprobs
            ok = True
            if complete:
                ctx.usage = Usage.whole(resp.headers)
                return Response(merge_body(first or b"", metas) if metas else first or b"", status,
                                resp.content_type, ctx.resp_headers), None
            if ctx.json().get("stream") is not True:  # a whole answer's progress (router/whole.py)
                tracker = StreamTracker()
                return await answer_whole(ctx, resp, first, tracker,
                                          lambda exc, keep: self._migrate(ctx, tracker, d, exc, keep)), None
            merger = SSEMerger(metas) if metas else None
            if track and merger is None:
                tracker = StreamTracker()
                err = await relay_stream(ctx, resp, first, tracker.feed, tracker.flush,
                                         lambda exc: self._migrate(ctx, tracker, d, exc))
            else:
                err = await relay_stream(ctx, resp, first, merger.feed if merger else None,
                                         merger.flush if merger else None)
            if err is not None:
                d.record(False, str(err))
                self.metrics.pd_failure("decode", err.kind)
                return Failure(502, b"", sent=True), "decode"
            return None, None
        except BaseException:  # the client went (cancelled, or a write to it failed), in any phase:
            ok = False  # cancel both legs now, so neither worker holds the room until a timeout
            raise
        finally:
            if not ok and not p_task.done():
                p_task.cancel()
            if not d_task.done():
                d_task.cancel()
                d_task.add_done_callback(_release_late)
            elif resp is None and not d_task.cancelled() and d_task.exception() is None:
                d_task.result()[0].release()
            if resp is not None:
                resp.release()
            d.in_flight -= 1
            d.processed += 1
