"""Decode's view of the prefill bootstrap servers: cached routes, layout check, heartbeat.

Lifecycle (decode server):
    client = BootstrapClient(my_layout, config)        # starts the heartbeat thread
    manager.watch(client)                               # dead prefill -> its rooms fail
    sources = client.routes(host, port, room, epoch)  # engine loop: never blocks (None = not yet)
    ... rooms.open(room, sources) ...                  # (endpoint, KV heads) of each prefill tp rank
      or  client.poll_route(host, port, rank, dp_rank)  # one rank's route, non-blocking
      or  client.get_route(host, port, rank, dp_rank=d)   # blocking, bounded (tools, tests)
    client.close()

A prefill rank that does not host the bootstrap server registers with `register_route` (PUT).
With prefill data parallelism a room's KV lives on dp rank `prefill_dp_rank(room, dp_size)` (the
contract's rule; every route says dp_size); routes are cached per (dp rank, tp rank). `routes`
picks that dp rank from the first route it learns (dp rank 0, tp rank 0), then every tp rank of
it, with the head range each rank's pool holds:

    room 7, prefill dp 2 x tp 2:  route(dp 0, tp 0) says dp_size 2 -> dp rank 7 % 2 = 1
                                  -> [(endpoint of (1, 0), heads (0, h/2)), (endpoint of (1, 1), heads (h/2, h/2))]
    an MLA model (latent pool):   every tp rank says heads (0, 1) of 1: each holds every latent, and
                                  transfer/tp/links.py takes each page from one of them

First contact with a prefill fetches GET /route and checks its KV layout against ours
(LayoutMismatch names the differing fields). The heartbeat polls GET /health of every known
prefill each `heartbeat_interval`; after `heartbeat_max_failure` consecutive misses, or when the
server's instance id changes (a restart at the same address), the prefill is declared dead:
its generation counter goes up, the dead callbacks get its endpoints, and its cached routes are
forgotten so that the next lookup re-learns a restarted prefill instead of serving stale data.

Role epochs (a prefill server's live role switches, server/elastic.py): a lookup may name the
epoch the router knew the prefill at. The bootstrap server refuses another epoch (409:
`StaleEpoch`); a cached route of an earlier epoch than the one named is dropped (the prefill
switched away and back: its earlier rooms are gone) and fetched again; a route of a later epoch
than the one named refuses the lookup at once (`StaleEpoch`), so a request never pairs with KV
of a role its router did not know.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import msgspec

from pdserve.contract import prefill_dp_rank
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import Health, KVLayout, LayoutMismatch, RouteInfo, RouteRegistration
from pdserve.disagg.transfer.tp.links import HeadRange, head_range

logger = logging.getLogger("pdserve.disagg.bootstrap")

RETRY_S = 0.2
T = TypeVar("T")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


class BootstrapError(RuntimeError):
    """A prefill's bootstrap server could not be reached or refused the request."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable  # nothing answered (vs. a refusal)


class StaleEpoch(BootstrapError):
    """The lookup named another role epoch than the prefill's (HTTP 409 from its bootstrap server)."""


class PrefillAddr(NamedTuple):
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    addr: PrefillAddr
    rank: int
    endpoint: str  # the prefill rank's transfer endpoint: pass to manager.receiver()
    layout: KVLayout
    instance: str
    generation: int  # bumps each time this prefill is declared dead
    num_ranks: int = 1  # the prefill's tensor-parallel ranks (routes 0..num_ranks-1)
    dp_rank: int = 0
    dp_size: int = 1  # the prefill's data-parallel ranks: room r lives on dp rank r % dp_size
    epoch: int = 1  # the prefill's role epoch when this route was learnt


DeadCallback = Callable[[PrefillAddr, list[str], str], None]  # (addr, transfer endpoints, reason)


@dataclass
class _Peer:
    instance: str | None = None
    routes: dict[tuple[int, int], Route] = field(default_factory=dict)  # (dp rank, tp rank)
    misses: int = 0


def http_url(host: str, port: int, path: str) -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


class _HttpStatus(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"HTTP {code}: {detail}")
        self.code = code


def fetch_json(url: str, typ: type[T], timeout: float, token: str | None = None) -> T:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return msgspec.json.decode(resp.read(), type=typ)
    except urllib.error.HTTPError as exc:
        raise _HttpStatus(exc.code, exc.read().decode(errors="replace")[:500]) from None


class BootstrapClient:
    def __init__(self, layout: KVLayout, config: DisaggConfig, *, fetch_timeout: float = 30.0,
                 heartbeat: bool = True) -> None:
        self.layout = layout
        self.config = config
        self.fetch_timeout = fetch_timeout
        self._lock = threading.Lock()
        self._peers: dict[PrefillAddr, _Peer] = {}
        self._generations: dict[PrefillAddr, int] = {}
        self._callbacks: list[DeadCallback] = []
        self._inflight: dict[tuple[PrefillAddr, int, int], threading.Thread] = {}
        self._errors: dict[tuple[PrefillAddr, int, int], Exception] = {}
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat, name="pd-heartbeat", daemon=True)
        if heartbeat:
            self._hb.start()

    # --- routes -------------------------------------------------------------------------------

    def cached(self, host: str, port: int, rank: int = 0, dp_rank: int = 0) -> Route | None:
        with self._lock:
            peer = self._peers.get(PrefillAddr(host, port))
            return None if peer is None else peer.routes.get((dp_rank, rank))

    def _current(self, host: str, port: int, rank: int, dp_rank: int, epoch: int | None) -> Route | None:
        """The cached route if it is of `epoch` (None: any); see the module docstring for the others."""
        route = self.cached(host, port, rank, dp_rank)
        if route is None or epoch is None or route.epoch == epoch:
            return route
        if epoch < route.epoch:
            raise StaleEpoch(f"prefill {host}:{port} is at epoch {route.epoch}, the request names {epoch}")
        self.forget(host, port, f"a new role epoch ({route.epoch} -> {epoch})")
        return None

    def get_route(self, host: str, port: int, rank: int = 0, timeout: float | None = None,
                  dp_rank: int = 0, epoch: int | None = None) -> Route:
        """The cached route, or fetch it (retrying while the server is down or the rank is not yet
        registered, up to `timeout`, default fetch_timeout). Raises LayoutMismatch/BootstrapError
        (StaleEpoch: the prefill is not at `epoch`)."""
        route = self._current(host, port, rank, dp_rank, epoch)
        if route is not None:
            return route
        addr = PrefillAddr(host, port)
        url = http_url(host, port, f"/route?rank={rank}&dp_rank={dp_rank}" + (f"&epoch={epoch}" if epoch else ""))
        deadline = time.monotonic() + (self.fetch_timeout if timeout is None else timeout)
        while True:
            try:
                info = fetch_json(url, RouteInfo, timeout=max(0.5, min(5.0, deadline - time.monotonic())),
                                  token=self.config.cluster_token)
                break
            except _HttpStatus as exc:
                if exc.code == 409:
                    raise StaleEpoch(f"bootstrap server {host}:{port}: {exc}") from None
                if exc.code != 404 or time.monotonic() >= deadline:
                    raise BootstrapError(f"bootstrap server {host}:{port}: {exc}") from None
            except (OSError, msgspec.DecodeError) as exc:
                if time.monotonic() >= deadline:
                    raise BootstrapError(f"cannot reach prefill bootstrap server {host}:{port}: {exc}") from None
            time.sleep(RETRY_S)
        self.layout.check_compatible(info.layout, mine="decode", theirs=f"prefill {host}:{port}")
        return self._store(addr, info)

    def poll_route(self, host: str, port: int, rank: int = 0, dp_rank: int = 0,
                   epoch: int | None = None) -> Route | None:
        """Non-blocking: the route, or None while a background fetch runs; raises that fetch's
        error (LayoutMismatch / BootstrapError) once, after which a later call retries."""
        route = self._current(host, port, rank, dp_rank, epoch)
        if route is not None:
            return route
        key = (PrefillAddr(host, port), dp_rank, rank)
        with self._lock:
            error = self._errors.pop(key, None)
            if error is not None:
                raise error
            if key not in self._inflight:
                t = threading.Thread(target=self._fetch, args=(*key, epoch), name="pd-route-fetch", daemon=True)
                self._inflight[key] = t
                t.start()
        return None

    def routes(self, host: str, port: int, room: int, epoch: int | None = None) -> list[tuple[str, HeadRange]] | None:
        """Non-blocking: (transfer endpoint, KV heads) of every tp rank, in rank order, of the
        prefill dp rank that holds `room`; None while one is still being fetched (every missing
        rank's fetch starts at once). Raises a fetch's error as poll_route does; `epoch`: the
        prefill's role epoch the request names (None: any)."""
        first = self.poll_route(host, port, epoch=epoch)
        if first is None:
            return None
        dp_rank = prefill_dp_rank(room, first.dp_size)
        if dp_rank != 0:
            first = self.poll_route(host, port, 0, dp_rank, epoch)
            if first is None:
                return None
        rest = [self.poll_route(host, port, rank, dp_rank, epoch) for rank in range(1, first.num_ranks)]
        if any(r is None for r in rest):
            return None
        return [(r.endpoint, head_range(r.layout)) for r in (first, *rest) if r is not None]

    def _fetch(self, addr: PrefillAddr, dp_rank: int, rank: int, epoch: int | None = None) -> None:
        try:
            self.get_route(addr.host, addr.port, rank, dp_rank=dp_rank, epoch=epoch)
        except (BootstrapError, LayoutMismatch) as exc:
            with self._lock:
                self._errors[(addr, dp_rank, rank)] = exc
        finally:
            with self._lock:
                self._inflight.pop((addr, dp_rank, rank), None)

    def _store(self, addr: PrefillAddr, info: RouteInfo) -> Route:
        restarted: list[str] = []
        with self._lock:
            peer = self._peers.setdefault(addr, _Peer())
            if peer.instance is not None and peer.instance != info.instance:
                restarted = self._drop_locked(addr)
                peer = self._peers.setdefault(addr, _Peer())
            peer.instance = info.instance
            route = Route(addr=addr, rank=info.rank, endpoint=info.endpoint, layout=info.layout,
                          instance=info.instance, generation=self._generations.get(addr, 0),
                          num_ranks=info.num_ranks, dp_rank=info.dp_rank, dp_size=info.dp_size, epoch=info.epoch)
            peer.routes[(info.dp_rank, info.rank)] = route
        if restarted:
            self._notify(addr, restarted, "restarted")
        return route

    # --- liveness -----------------------------------------------------------------------------

    def add_dead_callback(self, callback: DeadCallback) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def generation(self, host: str, port: int) -> int:
        with self._lock:
            return self._generations.get(PrefillAddr(host, port), 0)

    def known(self) -> list[PrefillAddr]:
        with self._lock:
            return list(self._peers)

    def forget(self, host: str, port: int, reason: str = "forgotten") -> None:
        """Declare a prefill dead now (callbacks run, routes dropped)."""
        addr = PrefillAddr(host, port)
        with self._lock:
            endpoints = self._drop_locked(addr) if addr in self._peers else None
        if endpoints is not None:
            self._notify(addr, endpoints, reason)

    def _drop_locked(self, addr: PrefillAddr) -> list[str]:
        peer = self._peers.pop(addr)
        self._generations[addr] = self._generations.get(addr, 0) + 1
        return [r.endpoint for r in peer.routes.values()]

    def _notify(self, addr: PrefillAddr, endpoints: list[str], reason: str) -> None:
        logger.warning("prefill %s:%d declared dead: %s", addr.host, addr.port, reason)
        with self._lock:
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb(addr, endpoints, reason)
            except Exception:
                logger.exception("dead-prefill callback failed")

    def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        while not self._stop.wait(interval):
            for addr in self.known():
                try:
                    health = fetch_json(http_url(addr.host, addr.port, "/health"), Health,
                                        timeout=max(0.2, min(interval, 2.0)))
                    instance: str | None = health.instance
                except (OSError, _HttpStatus, msgspec.DecodeError):
                    instance = None
                dead: tuple[list[str], str] | None = None
                with self._lock:
                    peer = self._peers.get(addr)
                    if peer is None:
                        continue
                    if instance is not None and instance == peer.instance:
                        peer.misses = 0
                    elif instance is not None:
                        dead = (self._drop_locked(addr), "restarted (new bootstrap instance)")
                    else:
                        peer.misses += 1
                        if peer.misses >= self.config.heartbeat_max_failure:
                            dead = (self._drop_locked(addr), f"missed {peer.misses} heartbeats")
                if dead is not None:
                    self._notify(addr, *dead)

    def close(self) -> None:
        self._stop.set()
        if self._hb.is_alive():
            self._hb.join(5.0)


def register_route(host: str, port: int, rank: int, endpoint: str, layout: KVLayout,
                   token: str | None = None, timeout: float = 10.0, dp_rank: int = 0, dp_size: int = 1,
                   wait_s: float = 0.0) -> None:
    """PUT /route from a prefill rank that does not host the bootstrap server; retried for up to
    `wait_s` while the server is not up yet (another dp rank starts it once its weights load)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _put_route(host, port, rank, endpoint, layout, token, timeout, dp_rank, dp_size)
        except BootstrapError as exc:
            if not exc.unreachable or time.monotonic() >= deadline:
                raise
        time.sleep(RETRY_S)


def _put_route(host: str, port: int, rank: int, endpoint: str, layout: KVLayout, token: str | None,
               timeout: float, dp_rank: int, dp_size: int) -> None:
    body = msgspec.json.encode(RouteRegistration(rank, endpoint, layout, dp_rank, dp_size))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(http_url(host, port, "/route"), data=body, headers=headers, method="PUT")
    try:
        with _OPENER.open(req, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise BootstrapError(f"bootstrap server {host}:{port} refused rank {rank}: HTTP {exc.code} {detail}") from None
    except OSError as exc:
        raise BootstrapError(f"cannot reach bootstrap server {host}:{port}: {exc}", unreachable=True) from None
