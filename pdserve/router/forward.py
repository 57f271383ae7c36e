"""Forwarding one request to a worker: regular mode, and the relay and failure shape PD mode shares.

Regular mode (`RegularForwarder`), per attempt: pick among routable workers not tried yet (all
of them once every one was tried), send the body as received, and classify the answer:
408/429/5xx and connection errors are failures (5xx and connection errors also count against
the worker's circuit); anything else is relayed — whole (Content-Length answers) or streamed
unbuffered. Retries wait with exponential backoff and jitter and happen only while the client
has not received a byte. When every attempt failed, the client gets the last worker's answer
(or a 502/504 describing the connection failure); with no routable worker at all, a 503.

`relay_stream` writes a streaming answer through as it arrives (no buffering beyond one TCP
read): the response head goes out with the first body bytes, which is the moment after
which a request can no longer be retried; its token events are metered on the way (router/usage.py:
`ctx.usage`, a whole answer's from its headers). A stream that breaks after that migrates to another
worker when it can (migrate.py, `--migration-limit`). A worker that fails mid-stream ends an SSE stream
with an OpenAI-style `data: {"error": ...}` event (other streams are cut). `Failure` records a
failed attempt: what to tell the client if no retry succeeds, and whether a retry is allowed.
`Forwarder` is what the app calls: this module's `RegularForwarder` or pd.py's `PDForwarder`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from pdserve.contract import STALE_EPOCH, TTFT_DEADLINE, error_code_is
from pdserve.router.admission import deadline_left_s, with_deadline_left
from pdserve.router.config import RouterConfig
from pdserve.router.http.client import UpstreamError, UpstreamPool, UpstreamResponse
from pdserve.router.http.protocol import Response
from pdserve.router.kv_index import KVIndex
from pdserve.router.metrics import RouterMetrics
from pdserve.router.migrate import StreamTracker, migratable, migrate, tracked_payload
from pdserve.router.policies import Policy
from pdserve.router.prompt_ids import exact_hits
from pdserve.router.request import RequestCtx, RouterError, error_body
from pdserve.router.resilience import backoff_s, breaker_failure, retryable_status
from pdserve.router.usage import StreamMeter, Usage
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("pdserve.router")


_DEADLINE = TTFT_DEADLINE.encode()
_enc = msgspec.json.Encoder()


class Failure:
    __slots__ = ("body", "content_type", "retry_after", "retryable", "sent", "status")

    def __init__(self, status: int, body: bytes, content_type: str | None = "application/json",
                 retryable: bool = True, sent: bool = False, retry_after: str | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retryable = retryable
        self.sent = sent
        self.retry_after = retry_after  # a worker's admission refusal (503): relayed to the client

    @classmethod
    def upstream(cls, exc: UpstreamError, who: str) -> Failure:
        status = 504 if exc.kind == "timeout" else 502
        return cls(status, error_body(status, f"{who}: {exc}", code=f"worker_{exc.kind}"))

    @classmethod
    def answer(cls, status: int, body: bytes, content_type: str | None, retry_after: str | None = None) -> Failure:
        """A worker's error answer; retryable as retryable_status says, or a 409 stale_epoch (the worker
        changed role since this router last looked: another worker or pair can serve it)."""
        return cls(status, body, content_type, retryable=retryable_status(status) or stale_epoch(status, body),
                   retry_after=retry_after)

    def response(self, ctx: RequestCtx) -> Response:
        extra = [("retry-after", self.retry_after)] if self.retry_after else []
        return Response(self.body, self.status, self.content_type, ctx.resp_headers + extra)

    def gives_up(self, registry: WorkerRegistry, role: str, tried: set[str]) -> bool:
        """No retry: a byte reached the client, the answer is final, or every worker of `role`
        refused it for overload already (Retry-After): the client gets that 503 now."""
        if self.sent or not self.retryable:
            return True
        return self.retry_after is not None and all(w.url in tried for w in registry.routable(role))


def stale_epoch(status: int, body: bytes) -> bool:
    """Did a worker refuse a leg for the role epoch it named (server/elastic.py)?"""
    return status == 409 and error_code_is(body, STALE_EPOCH)


def note_stale(w: Worker, status: int, body: bytes) -> None:
    """A stale_epoch answer takes `w` out until its /server_info is read again (router/health.py)."""
    if stale_epoch(status, body) and not w.stale:
        w.stale = True
        w.info = None
        logger.warning("worker %s (%s) is at another role epoch than %s: out until its /server_info is read "
                       "again", w.url, w.role, w.epoch)


def is_sse(content_type: str | None) -> bool:
    return bool(content_type) and content_type.startswith("text/event-stream")  # type: ignore[union-attr]


def sse_error(message: str, code: str) -> bytes:
    return b"data: " + msgspec.json.encode(msgspec.json.decode(error_body(502, message, code=code))) + b"\n\n"


async def relay_stream(ctx: RequestCtx, resp: UpstreamResponse, first: bytes | None,
                       transform: Callable[[bytes], bytes] | None = None,
                       flush: Callable[[], bytes] | None = None,
                       on_break: Callable[[UpstreamError], Awaitable[bool]] | None = None) -> UpstreamError | None:
    """Send the head, `first` (already read) and the rest of `resp`; returns a mid-stream error
    (after `on_break`, if given, could not continue the stream elsewhere: migrate.py)."""
    writer = ctx.req.writer
    ctype = resp.content_type
    headers = ctx.resp_headers + ([("cache-control", "no-cache")] if is_sse(ctype) else [])
    meter = StreamMeter(resp.headers, ctx.t0)
    await writer.start(resp.status, headers, ctype)
    try:
        async for chunk in resp.iter_chunks(first):
            meter.feed(chunk)
            await writer.write(transform(chunk) if transform else chunk)
            ctx.usage = meter.usage()
        if flush is not None:
            await writer.write(flush())
    except UpstreamError as exc:
        if on_break is not None and await on_break(exc):
            await writer.finish()
            return exc  # the worker failed, but the stream went on on another one
        if is_sse(ctype):
            await writer.write(sse_error(f"the worker failed mid-stream: {exc}", f"worker_{exc.kind}"))
            await writer.finish()
        return exc
    await writer.finish()
    return None


class Forwarder(Protocol):
    async def handle(self, ctx: RequestCtx) -> Response | None:
        """Answer one generation request: a whole `Response`, or None once it was streamed."""


class RegularForwarder:
    def __init__(self, cfg: RouterConfig, registry: WorkerRegistry, pool: UpstreamPool, policy: Policy,
                 metrics: RouterMetrics, index: KVIndex | None = None, role: str = "regular") -> None:
        self.cfg = cfg
        self.index = index
        self.role = role  # "decode" when PD sends a request to a decode alone (router/pd.py)
        self.registry = registry
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.timeout = cfg.limits.request_timeout_s

    async def handle(self, ctx: RequestCtx) -> Response | None:
        if self.policy.needs_text:
            ctx.json()  # a bad body is the client's 400, before any worker is bothered
        tried: set[str] = set()
        last: Failure | None = None
        for attempt in range(self.cfg.retry.max_attempts):
            if attempt:
                self.metrics.retry(ctx.route)
                await asyncio.sleep(backoff_s(self.cfg.retry, attempt - 1))
            ctx.mark()
            candidates = self.registry.routable("regular")
            if not candidates:
                break
            fresh = [w for w in candidates if w.url not in tried] or candidates
            worker = self.policy.select(fresh, ctx.text, await exact_hits(
                ctx, self.policy, self.index, fresh, self.pool, self.timeout))
            tried.add(worker.url)
            ctx.picked()
            outcome = await self.attempt(ctx, worker)
            if not isinstance(outcome, Failure):
                return outcome
            last = outcome
            if outcome.gives_up(self.registry, "regular", tried):
                break
        if last is None:
            raise RouterError(503, "no healthy worker is available", code="no_healthy_workers")
        return None if last.sent else last.response(ctx)

    def _tracked(self, ctx: RequestCtx) -> bool:
        """A stream that may migrate (cheap test first: most bodies never say "stream")."""
        if self.cfg.migration_limit <= 0 or b'"stream"' not in ctx.req.body:
            return False
        try:
            return migratable(ctx.json(), self.cfg.migration_limit, ctx.route)
        except RouterError:
            return False

    async def _migrate(self, ctx: RequestCtx, tracker: StreamTracker, w: Worker, exc: UpstreamError) -> bool:
        w.record(False, str(exc))
        ok = await migrate(ctx, ctx.json(), tracker, {w.url}, self.registry, self.role, self.policy, self.pool,
                           self.cfg.migration_limit, self.timeout)
        self.metrics.migrations.labels("ok" if ok else "failed").inc()
        return ok

    async def attempt(self, ctx: RequestCtx, w: Worker) -> Response | Failure | None:
        w.in_flight += 1
        resp = None
        track = self._tracked(ctx)
        payload = tracked_payload(ctx.json()) if track else ctx.req.body
        if _DEADLINE in ctx.req.body:  # the worker gets what is left of the client's deadline
            left = deadline_left_s(ctx.json(), ctx.t0)
            payload = tracked_payload(with_deadline_left(ctx.json(), left)) if track else \
                _enc.encode(with_deadline_left(ctx.json(), left))
        try:
            resp = await self.pool.request(w.host, w.port, ctx.req.method, ctx.req.target,
                                           w.fwd_headers + ctx.fwd_headers, payload, self.timeout)
            status = resp.status
            if retryable_status(status):
                body = await resp.read()
                w.record(not breaker_failure(status), f"answered {status}")
                self.metrics.worker_outcome(w.url, str(status))
                return Failure.answer(status, body, resp.content_type, resp.headers.get("retry-after"))
            if resp.buffered:
                body = await resp.read()
                w.record(True)
                ctx.usage = Usage.whole(resp.headers)
                return Response(body, status, resp.content_type, ctx.resp_headers)
            first = await resp.next_chunk()  # a failure before this byte can still be retried
            w.record(True)
            if track:
                tracker = StreamTracker()
                err = await relay_stream(ctx, resp, first, tracker.feed, tracker.flush,
                                         lambda exc: self._migrate(ctx, tracker, w, exc))
            else:
                err = await relay_stream(ctx, resp, first)
            if err is not None:
                w.record(False, str(err))
                return Failure(502, b"", sent=True)
            return None
        except UpstreamError as exc:
            w.record(False, str(exc))
            self.metrics.worker_outcome(w.url, exc.kind)
            if ctx.req.writer.started:
                return Failure(502, b"", sent=True)
            return Failure.upstream(exc, w.url)
        finally:
            w.in_flight -= 1
            w.processed += 1
            if resp is not None:
                resp.release()
