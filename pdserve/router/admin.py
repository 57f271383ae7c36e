"""Operational endpoints of the router: workers, readiness, metrics, info pass-through.

- `GET /health`, `/liveness`: the router process is up (always 200).
- `GET /readiness`: 200 when traffic can be served — a routable worker in regular mode, a
  routable prefill *and* decode in PD mode — else 503 with the counts.
- `GET/POST/DELETE /workers` (and `DELETE /workers/{url}`): list, add (probed at once, then
  health-checked like the others) and remove workers at runtime; API-key protected. With
  `--discovery` the list also says what etcd gave (`discovery`: url, connected, workers).
  SGLang's router's spellings answer too: `POST /add_worker?url=URL[&worker_type=prefill|decode]
  [&bootstrap_port=N]`, `POST /remove_worker?url=URL`, `GET /list_workers` (`{"urls": [...]}`).
- `GET /metrics`: Prometheus text. `GET /get_loads`: per-worker load.
- `GET/POST /admission`: admission control's thresholds and what it sees; change them at runtime.
- `GET /v1/models`, `/v1/models/{id}`, `/version`, `/server_info`, `/model_info`,
  `/health_generate`, `POST /tokenize`, `/detokenize`: answered by one routable (decode or
  regular) worker; `POST /flush_cache`: sent to every worker.
`Admin` is built by the app from the parts it reads or changes (config, registry, health
checker, limiter, metrics, upstream pool); `routes()` is its share of the app's route table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from pdserve.contract import SERVER_INFO_PATHS
from pdserve.router.admission import RouterAdmission
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.discovery import DiscoveredWorkers
from pdserve.router.health import HealthChecker
from pdserve.router.http.client import UpstreamError, UpstreamPool
from pdserve.router.http.protocol import Request, Response
from pdserve.router.kv_index import KVIndex
from pdserve.router.metrics import RouterMetrics
from pdserve.router.request import RouteFn, RouterError
from pdserve.router.resilience import ConcurrencyLimiter
from pdserve.router.workers import Worker, WorkerRegistry, new_worker

_enc = msgspec.json.Encoder()


def _json(obj: Any, rid: str, status: int = 200) -> Response:
    return Response(_enc.encode(obj), status, headers=[("x-request-id", rid)])


@dataclass(frozen=True, eq=False)
class Admin:
    cfg: RouterConfig
    registry: WorkerRegistry
    health: HealthChecker
    limiter: ConcurrencyLimiter
    metrics: RouterMetrics
    pool: UpstreamPool
    kv_index: KVIndex | None = None
    admission: RouterAdmission | None = None
    discovery: DiscoveredWorkers | None = None

    def routes(self) -> dict[str, dict[str, RouteFn]]:
        info: dict[str, RouteFn] = {"GET": self.pass_through}
        return {
            "/health": {"GET": self.liveness}, "/liveness": {"GET": self.liveness},
            "/readiness": {"GET": self.readiness}, "/metrics": {"GET": self.prometheus},
            "/workers": {"GET": self.list_workers, "POST": self.add_worker, "DELETE": self.remove_worker},
            "/workers/{url}": {"DELETE": self.remove_worker, "GET": self.get_worker},
            "/add_worker": {"POST": self.add_worker}, "/remove_worker": {"POST": self.remove_worker},
            "/list_workers": {"GET": self.list_urls},
            "/get_loads": {"GET": self.loads},
            "/v1/models": info, **{path: info for path in SERVER_INFO_PATHS}, "/model_info": info,
            "/get_model_info": info, "/health_generate": info, "/version": info, "/v1/models/{id}": info,
            "/tokenize": {"POST": self.pass_through}, "/detokenize": {"POST": self.pass_through},
            "/flush_cache": {"POST": self.flush_cache, "GET": self.flush_cache},
            "/kv_index": {"GET": self.kv_index_dump},
            "/admission": {"GET": self.get_admission, "POST": self.set_admission},
        }

    async def get_admission(self, req: Request, rid: str) -> Response:
        """Admission control's thresholds and each worker's figures (router/admission.py)."""
        assert self.admission is not None
        return _json(self.admission.describe(), rid)

    async def set_admission(self, req: Request, rid: str) -> Response:
        """Change admission control at runtime (a JSON object of its fields)."""
        assert self.admission is not None
        try:
            body = msgspec.json.decode(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError("send a JSON object of admission fields")
            self.admission.update(body)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise RouterError(400, str(exc), param="admission") from None
        return _json(self.admission.describe(), rid)

    async def kv_index_dump(self, req: Request, rid: str) -> Response:
        """The exact KV index per worker (router/kv_index.py): seq, sync state, block hashes."""
        if self.kv_index is None:
            raise RouterError(404, "the KV index is off (no cache_aware policy nor conditional PD)")
        return _json(self.kv_index.describe(), rid)

    async def liveness(self, req: Request, rid: str) -> Response:
        return _json({"status": "ok"}, rid)

    def _counts(self) -> dict[str, dict[str, int]]:
        reg = self.registry
        roles = ("prefill", "decode") if self.cfg.pd else ("regular",)
        return {r: {"total": len(reg.by_role(r)), "routable": len(reg.routable(r))} for r in roles}

    async def readiness(self, req: Request, rid: str) -> Response:
        counts = self._counts()
        ready = all(c["routable"] > 0 for c in counts.values())
        body = {"status": "ready" if ready else "not ready", "mode": "pd" if self.cfg.pd else "regular",
                "workers": counts}
        return _json(body, rid, 200 if ready else 503)

    async def prometheus(self, req: Request, rid: str) -> Response:
        text = self.metrics.render(self.registry.all(), self.limiter.active, self.limiter.queued,
                                   self.discovery.connected if self.discovery is not None else None)
        return Response(text, 200, CONTENT_TYPE_LATEST, [("x-request-id", rid)])

    async def list_workers(self, req: Request, rid: str) -> Response:
        workers = [w.describe() for w in self.registry.all()]
        found = {"discovery": self.discovery.describe()} if self.discovery is not None else {}
        return _json({"workers": workers, "total": len(workers), **self._counts(), **found}, rid)

    async def list_urls(self, req: Request, rid: str) -> Response:
        """SGLang's router's `/list_workers`: the urls (in PD mode also by role)."""
        out: dict[str, list[str]] = {"urls": [w.url for w in self.registry.all()]}
        if self.cfg.pd:
            out.update({role: [w.url for w in self.registry.by_role(role)] for role in ("prefill", "decode")})
        return _json(out, rid)

    async def get_worker(self, req: Request, rid: str) -> Response:
        worker = self.registry.get(self._url_from(req))
        if worker is None:
            raise RouterError(404, "no such worker", code="worker_not_found")
        return _json(worker.describe(), rid)

    async def loads(self, req: Request, rid: str) -> Response:
        return _json({"workers": [{"url": w.url, "role": w.role, "load": w.load, "in_flight": w.in_flight}
                                  for w in self.registry.all()]}, rid)

    @staticmethod
    def _worker_fields(req: Request) -> dict[str, Any]:
        """The JSON body's fields, or SGLang's query (`url`, `worker_type`, `bootstrap_port`)."""
        query = {k: v[0] for k, v in parse_qs(req.query).items()}
        if "url" in query:
            port = query.get("bootstrap_port")
            if port is not None and port.lower() != "none":
                if not port.isdigit():
                    raise RouterError(400, "'bootstrap_port' must be an integer", param="bootstrap_port")
            return {"url": query["url"], "role": query.get("worker_type", query.get("role")),
                    "bootstrap_port": int(port) if port is not None and port.isdigit() else None}
        try:
            body = msgspec.json.decode(req.body) if req.body else {}
        except msgspec.DecodeError:
            raise RouterError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RouterError(400, "request body must be a JSON object", code="invalid_json")
        return body

    async def add_worker(self, req: Request, rid: str) -> Response:
        body = self._worker_fields(req)
        pd = self.cfg.pd
        url, role, port = body.get("url"), body.get("role"), body.get("bootstrap_port")
        if not isinstance(url, str):
            raise RouterError(400, "'url' (string) is required", param="url")
        if role is None:
            if pd:
                raise RouterError(400, "PD mode: 'role' must be 'prefill' or 'decode'", param="role")
            role = "regular"
        if role not in (("prefill", "decode") if pd else ("regular",)):
            raise RouterError(400, f"role {role!r} does not fit a {'PD' if pd else 'regular'} router", param="role")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise RouterError(400, "'bootstrap_port' must be an integer", param="bootstrap_port")
        try:
            spec = WorkerSpec(url=url, role=role, bootstrap_port=port)
        except ValueError as exc:
            raise RouterError(400, str(exc), param="url") from None
        if self.registry.get(spec.url) is not None:
            raise RouterError(409, f"worker {spec.url} is already registered", code="worker_exists")
        worker = new_worker(spec, self.cfg)
        self.registry.add(worker)
        if self.cfg.health.enabled:
            await self.health.check(worker)
        return _json({"added": worker.describe()}, rid, 201)

    @staticmethod
    def _url_from(req: Request) -> str:
        if req.path.startswith("/workers/"):
            return unquote(req.path[len("/workers/"):])
        values = parse_qs(req.query).get("url")
        if values:
            return values[0]
        if req.body:
            try:
                body = msgspec.json.decode(req.body)
            except msgspec.DecodeError:
                raise RouterError(400, "request body is not valid JSON", code="invalid_json") from None
            if isinstance(body, dict) and isinstance(body.get("url"), str):
                return body["url"]
        raise RouterError(400, "say which worker: DELETE /workers?url=URL or a body {\"url\": URL}", param="url")

    async def remove_worker(self, req: Request, rid: str) -> Response:
        raw = self._url_from(req)
        try:
            url = WorkerSpec(url=raw).url
        except ValueError as exc:
            raise RouterError(400, str(exc), param="url") from None
        worker = self.registry.remove(url)
        if worker is None:
            raise RouterError(404, f"no worker {url}", code="worker_not_found")
        return _json({"removed": url}, rid)

    def _info_worker(self) -> Worker:
        role = "decode" if self.cfg.pd else "regular"
        workers = self.registry.routable(role)
        if not workers:
            raise RouterError(503, f"no healthy {role} worker to ask", code="no_healthy_workers")
        return min(workers, key=lambda w: w.in_flight)

    async def pass_through(self, req: Request, rid: str) -> Response:
        w = self._info_worker()
        try:
            resp = await self.pool.request(w.host, w.port, req.method, req.target,
                                           w.fwd_headers + f"x-request-id: {rid}\r\n".encode(),
                                           req.body if req.method == "POST" else b"", self.cfg.health.timeout_s * 6)
            try:
                body = await resp.read()
            finally:
                resp.release()
        except UpstreamError as exc:
            raise RouterError(502, f"worker {w.url}: {exc}", code=f"worker_{exc.kind}") from None
        return Response(body, resp.status, resp.content_type, [("x-request-id", rid)])

    async def flush_cache(self, req: Request, rid: str) -> Response:
        results: dict[str, int | str] = {}
        for w in self.registry.all():
            try:
                resp = await self.pool.request(w.host, w.port, "POST", "/flush_cache", w.fwd_headers, b"",
                                                   self.cfg.health.timeout_s * 6)
                try:
                    await resp.read()
                finally:
                    resp.release()
                results[w.url] = resp.status
            except UpstreamError as exc:
                results[w.url] = str(exc)
        ok = all(v == 200 for v in results.values())
        return _json({"success": ok, "workers": results}, rid, 200 if ok else 502)
