"""Regular mode: one request → one worker chosen by the policy, with retries.

Per attempt: pick among routable workers not tried yet (all of them once every one was
tried), send the body as received, and classify the answer: 408/429/5xx and connection
errors are failures (5xx and connection errors also count against the worker's circuit);
anything else is relayed — whole (Content-Length answers) or streamed unbuffered. Retries
wait with exponential backoff and jitter and happen only while the client has not received
a byte. When every attempt failed, the client gets the last worker's answer (or a 502/504
describing the connection failure); with no routable worker at all, a 503.
"""

from __future__ import annotations

import asyncio

from pdserve.router.config import RouterConfig
from pdserve.router.http.client import UpstreamError, UpstreamPool
from pdserve.router.http.protocol import Response
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy
from pdserve.router.relay import Failure, relay_stream
from pdserve.router.request import RequestCtx, RouterError
from pdserve.router.resilience import backoff_s, breaker_failure, retryable_status
from pdserve.router.workers import Worker, WorkerRegistry


class RegularForwarder:
    def __init__(self, cfg: RouterConfig, registry: WorkerRegistry, pool: UpstreamPool, policy: Policy,
                 metrics: RouterMetrics) -> None:
        self.cfg = cfg
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
            candidates = self.registry.routable("regular")
            if not candidates:
                break
            fresh = [w for w in candidates if w.url not in tried] or candidates
            worker = self.policy.select(fresh, ctx.text)
            tried.add(worker.url)
            outcome = await self.attempt(ctx, worker)
            if not isinstance(outcome, Failure):
                return outcome
            last = outcome
            if outcome.sent or not outcome.retryable:
                break
        if last is None:
            raise RouterError(503, "no healthy worker is available", code="no_healthy_workers")
        return None if last.sent else last.response(ctx)

    async def attempt(self, ctx: RequestCtx, w: Worker) -> Response | Failure | None:
        w.in_flight += 1
        resp = None
        try:
            resp = await self.pool.request(w.host, w.port, ctx.req.method, ctx.req.target,
                                           w.fwd_headers + ctx.fwd_headers, ctx.req.body, self.timeout)
            status = resp.status
            if retryable_status(status):
                body = await resp.read()
                w.record(not breaker_failure(status), f"answered {status}")
                self.metrics.worker_outcome(w.url, str(status))
                return Failure.answer(status, body, resp.content_type)
            if resp.buffered:
                body = await resp.read()
                w.record(True)
                return Response(body, status, resp.content_type, ctx.resp_headers)
            first = await resp.next_chunk()  # a failure before this byte can still be retried
            w.record(True)
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
