"""The bootstrap server on each prefill server: where decode learns a prefill rank's transfer
endpoint and KV layout, and checks that the prefill is alive.

Lifecycle (prefill server):
    server = publish_routes(config, rooms.ranks, dp_rank, dp_size)   # both of the below:
      dp rank 0:   server = BootstrapServer.from_config(config).start()  # aiohttp in its own thread + loop
                   server.register(rank, manager.endpoint, layout)       # its ranks, in-process
      dp rank > 0: bootstrap_client.register_route(host, port, rank, ...)  # over HTTP PUT; no server
    ... serve ...
    server.close()

HTTP (JSON bodies from pdserve.disagg.messages):
    PUT /route          RouteRegistration -> 200 | 400 bad body | 401 token | 409 layout conflict
    GET /route?rank=N&dp_rank=M[&epoch=E] -> RouteInfo (404 until registered; both default to 0;
                        409 when E is not this server's role epoch: a lookup for an earlier role
                        of this server, never paired with its KV)
Routes are keyed by (dp rank, tp rank): a prefill server with --dp-size D runs D engines, each
registering its tp ranks with its dp rank; a room's KV lives on dp rank bootstrap_room % D.
    GET /health         -> Health {status, instance}; `instance` changes when the server restarts
Authentication: with a cluster secret (PDSERVE_CLUSTER_TOKEN, or the server's --api-key when
that is unset) `PUT /route` and `GET /route` need `Authorization: Bearer <secret>` (401, table
unchanged, otherwise). With no secret at all, registrations are accepted from loopback peers
only (403 for others), as the start-up log says. `/health` is always open (the heartbeat).
Binds 127.0.0.1 unless told otherwise. The clients (decode's BootstrapClient, register_route) are in
bootstrap_client.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import uuid

import msgspec
from aiohttp import web

from pdserve.contract import DEFAULT_BOOTSTRAP_PORT
from pdserve.disagg.bootstrap_client import http_url, register_route
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import Health, HttpError, KVLayout, LayoutMismatch, RouteInfo, RouteRegistration
from pdserve.disagg.transfer.sessions.handshake import secret_matches

logger = logging.getLogger("pdserve.disagg.bootstrap")


MAX_BODY = 1 << 20
REGISTER_WAIT_S = 600.0  # a dp rank > 0 waits this long for dp rank 0's bootstrap server (weights load first)


def _json(obj: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class BootstrapServer:
    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_BOOTSTRAP_PORT,
                 cluster_token: str | None = None, epoch: int = 1) -> None:
        self.host = host
        self.epoch = epoch
        self.requested_port = port
        self.cluster_token = cluster_token
        self.instance = uuid.uuid4().hex
        self._routes: dict[tuple[int, int], RouteRegistration] = {}  # (dp rank, tp rank)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None

    @classmethod
    def from_config(cls, config: DisaggConfig) -> BootstrapServer:
        return cls(config.bootstrap_host, config.bootstrap_port, config.cluster_token, config.epoch)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("bootstrap server not started")
        return self._port

    @property
    def url(self) -> str:
        return http_url(self.host, self.port, "")

    # --- routes -------------------------------------------------------------------------------

    def register(self, rank: int, endpoint: str, layout: KVLayout, dp_rank: int = 0, dp_size: int = 1) -> None:
        """Register (or replace) a rank; every rank must share one layout (LayoutMismatch)."""
        if rank < 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"rank must be >= 0 and dp_rank in [0, dp_size), got {rank}, {dp_rank}, {dp_size}")
        with self._lock:
            for key, other in self._routes.items():
                if key != (dp_rank, rank):
                    other.layout.check_compatible(layout, mine=f"rank {key}", theirs=f"rank {(dp_rank, rank)}")
                if other.dp_size != dp_size:
                    raise ValueError(f"dp rank {dp_rank} says dp_size {dp_size}, dp rank {other.dp_rank} said "
                                     f"{other.dp_size}")
            self._routes[(dp_rank, rank)] = RouteRegistration(rank, endpoint, layout, dp_rank, dp_size)

    def route(self, rank: int, dp_rank: int = 0) -> RouteInfo | None:
        with self._lock:
            reg = self._routes.get((dp_rank, rank))
            if reg is None:
                return None
            num_ranks = sum(1 for d, _ in self._routes if d == dp_rank)
            return RouteInfo(rank=rank, endpoint=reg.endpoint, layout=reg.layout, instance=self.instance,
                             num_ranks=num_ranks, dp_rank=dp_rank, dp_size=reg.dp_size, epoch=self.epoch)

    # --- HTTP handlers ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return _json(Health(status="ok", instance=self.instance))

    def _refused(self, request: web.Request, write: bool) -> web.Response | None:
        """401 without the cluster secret (when one is set); with none, writes from loopback only."""
        if self.cluster_token is not None:
            scheme, _, got = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secret_matches(got.strip(), self.cluster_token):
                return _json(HttpError(error="missing or wrong cluster token (or --api-key)"), 401)
            return None
        if write and not _loopback(request.remote):
            return _json(HttpError(error="route registration is accepted from loopback peers only "
                                         "(set PDSERVE_CLUSTER_TOKEN or --api-key to allow remote ranks)"), 403)
        return None

    async def _get_route(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request, write=False)) is not None:
            return refused
        raw, raw_dp = request.query.get("rank", "0"), request.query.get("dp_rank", "0")
        raw_epoch = request.query.get("epoch", str(self.epoch))
        try:
            rank, dp_rank, epoch = int(raw), int(raw_dp), int(raw_epoch)
        except ValueError:
            return _json(HttpError(error=f"rank, dp_rank and epoch must be integers, got {raw!r}, {raw_dp!r}, "
                                         f"{raw_epoch!r}"), 400)
        if epoch != self.epoch:
            return _json(HttpError(error=f"stale epoch {epoch}: this prefill is at epoch {self.epoch}"), 409)
        info = self.route(rank, dp_rank)
        if info is None:
            return _json(HttpError(error=f"prefill rank {rank} of dp rank {dp_rank} is not registered"), 404)
        return _json(info)

    async def _put_route(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request, write=True)) is not None:
            return refused
        try:
            reg = msgspec.json.decode(await request.read(), type=RouteRegistration)
            self.register(reg.rank, reg.endpoint, reg.layout, reg.dp_rank, reg.dp_size)
        except LayoutMismatch as exc:
            return _json(HttpError(error=str(exc)), 409)
        except (msgspec.DecodeError, ValueError) as exc:
            return _json(HttpError(error=f"bad route registration: {exc}"), 400)
        return _json(Health(status="ok", instance=self.instance))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> BootstrapServer:
        self._thread = threading.Thread(target=self._run, name="pd-bootstrap", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"bootstrap server did not start within {timeout} s")
        if self._error is not None:
            raise OSError(f"bootstrap server cannot listen on {self.host}:{self.requested_port}: {self._error}")
        if self.cluster_token is not None:
            logger.info("bootstrap server on %s:%d: /route needs the cluster token (or --api-key)", self.host,
                        self.port)
        else:
            logger.warning("bootstrap server on %s:%d: no cluster token or --api-key, so route registrations "
                           "are accepted from loopback peers only", self.host, self.port)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/health", self._health)
        app.router.add_get("/route", self._get_route)
        app.router.add_put("/route", self._put_route)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.requested_port, backlog=128)
            loop.run_until_complete(site.start())
            self._port = runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def close(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def __enter__(self) -> BootstrapServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_routes(config: DisaggConfig, ranks: list[tuple[str, KVLayout]], dp_rank: int = 0,
                   dp_size: int = 1) -> BootstrapServer | None:
    """Register every tp rank's (transfer endpoint, layout): in-process on dp rank 0, which hosts
    the started server it returns; over HTTP from the other dp ranks (None: no server here)."""
    if dp_rank == 0:
        server = BootstrapServer.from_config(config).start()
        try:
            for rank, (endpoint, layout) in enumerate(ranks):
                server.register(rank, endpoint, layout, 0, dp_size)
        except BaseException:
            server.close()
            raise
        return server
    for rank, (endpoint, layout) in enumerate(ranks):
        register_route(config.bootstrap_host, config.bootstrap_port, rank, endpoint, layout, config.cluster_token,
                       dp_rank=dp_rank, dp_size=dp_size, wait_s=REGISTER_WAIT_S)
    return None
