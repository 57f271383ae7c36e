"""The router application: composition, request dispatch, auth, limits.

Lifecycle of `RouterApp`:
  - construction builds the parts from the frozen config: worker registry (workers start
    unhealthy until a first good health check, or healthy when checks are off), one policy
    per role, the health checker, the upstream connection pool, the limiter, metrics, the
    regular or PD forwarder, and the route table (generation routes here, the operational
    ones from admin.py), and with `--discovery` the etcd watch that adds and removes workers
    (router/discovery.py);
  - `start()` opens the control-plane aiohttp session, runs one round of health checks and
    starts the background loops (health checks, `/get_load` polling for power_of_two and the
    PD prefill queue limit, tree eviction for cache_aware, KV-event subscribers feeding the
    exact index (router/kv_sync.py) when cache_aware or conditional PD uses it);
  - `handle(request)` (called by the HTTP server for every request) tags it with a request
    id, answers a CORS preflight (flags/cors.py; before the key: browsers send none with it),
    routes it, checks the API key (all routes except /health, /liveness, /readiness,
    /metrics), and for generation routes: admission control (router/admission.py: 503 +
    Retry-After), a concurrency slot in the body's priority order (429/408), forwarding (the
    legs get what is left of its TTFT deadline; /v1/responses' previous_response_id expanded
    first) and metrics; with --enable-trace a `pdserve.router` span (its child "router pick";
    the legs carry its traceparent); every error is an OpenAI-style body with the request id
    header, and every answer to an allowed origin its CORS headers;
  - `stop()` cancels the loops and closes the pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import Any

import aiohttp

from pdserve.contract import PRIORITY, TTFT_DEADLINE
from pdserve.flags.cors import ALLOW_ORIGIN, preflight_headers, response_headers
from pdserve.router.admin import Admin
from pdserve.router.admission import RouterAdmission, deadline_left_s
from pdserve.router.config import RouterConfig
from pdserve.router.discovery import DiscoveredWorkers
from pdserve.router.forward import Forwarder, RegularForwarder
from pdserve.router.health import HealthChecker, LoadMonitor
from pdserve.router.http.client import UpstreamPool
from pdserve.router.http.protocol import Request, Response
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_sync import KVSync
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pd import PDForwarder
from pdserve.router.policies import Policy, make_policy
from pdserve.router.request import RequestCtx, RouteFn, RouterError, error_body, pick_request_id
from pdserve.router.resilience import ConcurrencyLimiter
from pdserve.router.responses import Responses
from pdserve.router.workers import Worker, WorkerRegistry, new_worker
from pdserve.tracing import TRACEPARENT, NoTracer, Tracer, make_tracer

logger = logging.getLogger("pdserve.router")
_PRIORITY, _DEADLINE = f'"{PRIORITY}"'.encode(), f'"{TTFT_DEADLINE}"'.encode()
GENERATE_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses")
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness", "/metrics"})


class RouterApp:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.registry = WorkerRegistry()
        self.metrics = RouterMetrics(cfg.metrics_prefix)
        self.pool = UpstreamPool(cfg.limits.connect_timeout_s)
        self.limiter = ConcurrencyLimiter(cfg.limits.max_concurrent, cfg.limits.queue_size,
                                          cfg.limits.queue_timeout_s)
        roles = ("prefill", "decode") if cfg.pd else ("regular",)
        self.policies: dict[str, Policy] = {role: make_policy(cfg.policy_for(role)) for role in roles}
        self.health = HealthChecker(cfg.health, self.registry, cfg.worker_key)
        self.session: aiohttp.ClientSession | None = None
        self.registry.subscribe(self._on_registry_change)
        for spec in cfg.workers:
            self.registry.add(new_worker(spec, cfg))
        self.discovery = DiscoveredWorkers(cfg, cfg.discovery, self.registry, self.metrics) if cfg.discovery else None
        self.kv_index = KVIndex() if cfg.uses_kv_index else None
        self.forwarder: Forwarder
        if cfg.pd:
            self.forwarder = PDForwarder(cfg, self.registry, self.pool, self.policies["prefill"],
                                         self.policies["decode"], self.metrics, self.kv_index)
        else:
            self.forwarder = RegularForwarder(cfg, self.registry, self.pool, self.policies["regular"], self.metrics,
                                              self.kv_index)
        self._tasks: list[asyncio.Task[Any]] = []
        self._key = cfg.api_key.encode() if cfg.api_key else None
        self._forward_client_auth = cfg.worker_key is None
        self.admission = RouterAdmission(cfg.admission, self.registry, self.metrics, cfg.pd)
        self.tracer: Tracer = make_tracer("pdserve-router", cfg.otlp_traces_endpoint) if cfg.enable_trace \
            else NoTracer()
        self.admin = Admin(cfg, self.registry, self.health, self.limiter, self.metrics, self.pool, self.kv_index,
                           self.admission, self.discovery)
        self.responses = Responses(cfg, self.registry, self.pool)
        self.routes: dict[str, dict[str, RouteFn]] = {path: {"POST": self.generate} for path in GENERATE_ROUTES}
        for path, methods in (*self.admin.routes().items(), *self.responses.routes().items()):
            self.routes.setdefault(path, {}).update(methods)

    def _on_registry_change(self, event: str, worker: Worker) -> None:
        if event == "removed":
            policy = self.policies.get(worker.role)
            if policy is not None:
                policy.on_removed(worker)
        else:
            self.health.wake()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        if self.discovery is not None:  # first: the round of health checks below probes discovered workers too
            await self.discovery.start()
        await self.health.start(self.session)
        if self.cfg.health.enabled:
            self._tasks.append(asyncio.create_task(self.health.run(), name="health-checks"))
        if self.kv_index is not None:
            sync = KVSync(self.registry, self.kv_index, lambda: self.session, self.cfg.worker_key,
                          self.cfg.health.timeout_s, lambda url: self.metrics.kv_resyncs.labels(url).inc())
            self._tasks.append(asyncio.create_task(sync.run(), name="kv-events"))
        polled = self.cfg.pd_prefill_queue_limit is not None or self.cfg.admission.enabled
        if polled or any(p.name == "power_of_two" for p in self.policies.values()):
            monitor = LoadMonitor(self.cfg.health.load_interval_s, self.cfg.health.timeout_s, self.registry,
                                  self.session, self.cfg.worker_key)
            self._tasks.append(asyncio.create_task(monitor.run(), name="load-monitor"))
        if any(p.name == "cache_aware" for p in self.policies.values()):
            self._tasks.append(asyncio.create_task(self._maintain(), name="tree-eviction"))

    async def _maintain(self) -> None:
        interval = min(self.cfg.policy_for(r).eviction_interval_s for r in self.policies)
        while True:
            await asyncio.sleep(interval)
            for policy in self.policies.values():
                policy.maintain()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.session is not None:
            await self.session.close()
        self.pool.close()
        self.tracer.close()

    # -- requests ---------------------------------------------------------------------------
    def authorized(self, headers: dict[str, str]) -> bool:
        key = self._key
        if key is None:
            return True
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
                return True
        other = headers.get("x-api-key")
        return other is not None and hmac.compare_digest(other.strip().encode(), key)

    async def handle(self, req: Request) -> Response | None:
        rid = pick_request_id(req.headers, self.cfg.request_id_headers)
        origin = req.headers.get("origin")
        wanted = req.headers.get("access-control-request-method")
        if req.method == "OPTIONS" and origin is not None and wanted is not None:
            asked = req.headers.get("access-control-request-headers")
            allowed = preflight_headers(self.cfg.cors, origin, wanted, asked)
            if allowed is None:
                return Response(b"Disallowed CORS request", 400, "text/plain", [("x-request-id", rid)])
            return Response(b"", 200, None, [("x-request-id", rid), *allowed])
        resp = await self._route(req, rid)
        if resp is not None and origin is not None and not any(k == ALLOW_ORIGIN for k, _ in resp.headers):
            resp.headers = [*resp.headers, *response_headers(self.cfg.cors, origin)]  # (generate's has them)
        return resp

    async def metrics_only(self, req: Request) -> Response | None:
        """The `--prometheus-port` listener: GET /metrics and nothing else."""
        rid = pick_request_id(req.headers, self.cfg.request_id_headers)
        if req.path != "/metrics" or req.method != "GET":
            return Response(error_body(404, f"no route {req.path} here (metrics only)"), 404,
                            headers=[("x-request-id", rid)])
        return await self.admin.prometheus(req, rid)

    async def _route(self, req: Request, rid: str) -> Response | None:
        try:
            methods = self.routes.get(req.path)
            if methods is None and req.path.startswith("/workers/"):
                methods = self.routes.get("/workers/{url}")
            if methods is None and req.path.startswith("/v1/models/"):
                methods = self.routes.get("/v1/models/{id}")
            if methods is None and req.path.startswith("/v1/responses/"):
                methods = self.routes.get("/v1/responses/{id}")
            if methods is None:
                raise RouterError(404, f"no route {req.path}")
            if self._key is not None and req.path not in OPEN_PATHS and not self.authorized(req.headers):
                raise RouterError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")
            fn = methods.get(req.method)
            if fn is None:
                raise RouterError(405, f"{req.method} is not allowed on {req.path}; use {', '.join(methods)}")
            return await fn(req, rid)
        except RouterError as exc:
            headers = [("x-request-id", rid), *exc.headers]
            if exc.status == 401:
                headers.append(("www-authenticate", "Bearer"))
            return Response(error_body(exc.status, exc.message, exc.code, exc.param), exc.status,
                            headers=headers)

    async def generate(self, req: Request, rid: str) -> Response | None:
        t0 = time.perf_counter()
        status = 500
        ctx: RequestCtx | None = None
        span = None
        if self.tracer.enabled:
            span = self.tracer.begin("pdserve.router", req.headers.get(TRACEPARENT), time.time_ns(),
                                     {"pdserve.request_id": rid, "pdserve.route": req.path})
        try:
            ctx = RequestCtx(req, rid, req.path, req.headers.get("authorization") if self._forward_client_auth
                             else None, self.tracer, span)
            try:
                priority, left = self._queue_fields(ctx)
                self.admission.check(left)
                await self.limiter.acquire(priority)
            except RouterError as exc:
                status = exc.status
                if exc.status in (408, 429):
                    self.metrics.rejected.labels("queue_full" if exc.status == 429 else "queue_timeout").inc()
                raise
            try:
                ctx.resp_headers += response_headers(self.cfg.cors, req.headers.get("origin"))  # a stream's too
                if req.path == "/v1/responses" and b"previous_response_id" in req.body:
                    await self.responses.expand(ctx)
                resp = await self.forwarder.handle(ctx)
                status = resp.status if resp is not None else req.writer.status
                return resp
            except RouterError as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away
                raise
            finally:
                self.limiter.release()
        finally:
            self.metrics.request_done(req.path, status, time.perf_counter() - t0)
            if status == 200 and ctx is not None and ctx.usage is not None:
                self.metrics.generation(ctx.usage)
            if span is not None:
                span.end(time.time_ns())

    @staticmethod
    def _queue_fields(ctx: RequestCtx) -> tuple[int, float | None]:
        """The body's priority (the queue's order) and the seconds left of its TTFT deadline; the
        body is parsed only when it names one of them."""
        raw = ctx.req.body
        if _PRIORITY not in raw and _DEADLINE not in raw:
            return 0, None
        body = ctx.json()
        value = body.get(PRIORITY)
        priority = value if isinstance(value, int) and not isinstance(value, bool) else 0
        return priority, deadline_left_s(body, ctx.t0)
