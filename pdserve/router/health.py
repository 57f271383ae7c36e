"""Active health checks and load polling of the workers (control plane, aiohttp).

`HealthChecker` lifecycle: built with the app (so `POST /workers` can probe a new worker);
`start(session)` takes the control-plane session and probes every worker once before the
router takes traffic (with checks off it only reads their `/server_info`); `run()` then
probes each worker every `interval_s` (a worker that has never been healthy, e.g. still
loading its model, every 0.5 s), with `timeout_s` per probe. A first success makes a new
worker healthy at once; afterwards `failure_threshold` consecutive failures eject it and
`success_threshold` consecutive successes bring it back. A worker marked `stale` (a leg answered
409 stale_epoch) has its /server_info read again at its next good probe (every 0.5 s): its epoch
is refreshed and it routes again if its mode still fits its role. Every probe of a worker that has
been healthy once also feeds its circuit breaker, so a dead worker both leaves rotation and
opens its circuit (a server still loading its model trips nothing). Fast rejoin: a worker that
is unhealthy or whose circuit is open is probed every 0.5 s, and a probe that succeeds while
its circuit is open moves it to half-open at once (a trial) instead of waiting out
`open_duration_s`, so a restarted worker serves again within about a second of answering. A prefill without a known
bootstrap port learns it from its `/server_info`.
`LoadMonitor.run()` polls `/get_load` of healthy workers for `power_of_two`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp

from pdserve.contract import MODE_OF_ROLE, SERVER_INFO_PATH, ServerInfo, decode_server_info
from pdserve.router.config import HealthConfig
from pdserve.router.resilience import OPEN
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("pdserve.router")
STARTING_INTERVAL_S = 0.5


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def get_server_info(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                          timeout_s: float) -> ServerInfo | None:
    """A worker's /server_info now, or None (unreachable, not 200, not a server-info object)."""
    try:
        async with session.get(url + SERVER_INFO_PATH, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return decode_server_info(await resp.read()) if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


class HealthChecker:
    def __init__(self, cfg: HealthConfig, registry: WorkerRegistry, api_key: str | None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.session: aiohttp.ClientSession  # given by start()
        self.api_key = api_key
        self._last: dict[str, float] = {}  # url -> when its last probe ended
        self._wake = asyncio.Event()

    async def probe(self, worker: Worker) -> tuple[bool, str | None]:
        try:
            async with self.session.get(worker.url + self.cfg.endpoint, headers=_auth(self.api_key),
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)) as resp:
                await resp.read()
                return resp.status == 200, None if resp.status == 200 else f"health check answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return False, f"health check failed: {type(exc).__name__}: {exc}"

    def apply(self, worker: Worker, ok: bool, error: str | None = None) -> None:
        if worker.ever_healthy:  # a server still starting up must not trip its breaker
            if ok and worker.breaker.state == OPEN:
                worker.breaker.trial()
                logger.info("worker %s (%s) answers its health check again: circuit half-open", worker.url,
                            worker.role)
            worker.breaker.record(ok)
        if ok:
            worker.health_failures = 0
            worker.health_successes += 1
            if not worker.healthy and (not worker.ever_healthy
                                       or worker.health_successes >= self.cfg.success_threshold):
                worker.healthy = worker.ever_healthy = True
                worker.last_error = None
                logger.info("worker %s (%s) is healthy", worker.url, worker.role)
            return
        worker.health_successes = 0
        worker.health_failures += 1
        worker.last_error = error
        if worker.healthy and worker.health_failures >= self.cfg.failure_threshold:
            worker.healthy = False
            logger.warning("worker %s (%s) is unhealthy: %s", worker.url, worker.role, error)

    async def check(self, worker: Worker) -> bool:
        ok, error = await self.probe(worker)
        if worker.removed:
            return ok
        self.apply(worker, ok, error)
        if ok and (worker.info is None or worker.stale):
            await self.fetch_info(worker)
        self._last[worker.url] = time.monotonic()
        return ok

    def _next_check(self, worker: Worker) -> float:
        """When `worker` is due: every interval_s, or every 0.5 s while it is unhealthy or open."""
        fast = not worker.healthy or worker.stale or worker.breaker.state == OPEN
        interval = min(self.cfg.interval_s, STARTING_INTERVAL_S) if fast else self.cfg.interval_s
        return self._last.get(worker.url, 0.0) + interval

    async def fetch_info(self, worker: Worker) -> None:
        """Remember /server_info; learn a prefill's bootstrap port when none was given."""
        info = await get_server_info(self.session, worker.url, _auth(self.api_key), self.cfg.timeout_s)
        if info is None:
            return
        worker.info = info
        if info.epoch is not None:
            worker.epoch = info.epoch
        mode = info.disaggregation_mode
        if mode is not None and mode != MODE_OF_ROLE[worker.role]:
            if worker.stale:  # said once, when it answered stale_epoch (router/forward.py)
                return
            logger.warning("worker %s was added as %s but reports disaggregation_mode=%s", worker.url,
                           worker.role, mode)
        elif worker.stale and not info.draining:
            worker.stale = False
            logger.info("worker %s (%s) is at epoch %s: routable again", worker.url, worker.role, worker.epoch)
        if worker.role == "prefill" and worker.bootstrap_port is None:
            port = info.prefill_bootstrap_port()
            if port is not None:
                worker.bootstrap_port = port
                logger.info("prefill %s: bootstrap port %d (from /server_info)", worker.url, port)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        if self.cfg.enabled:
            await asyncio.gather(*(self.check(w) for w in self.registry.all()))
        else:
            await asyncio.gather(*(self.fetch_info(w) for w in self.registry.all()))

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            due = [w for w in self.registry.all() if self._next_check(w) <= now]
            if due:
                await asyncio.gather(*(self.check(w) for w in due))
            known = [self._next_check(w) for w in self.registry.all()]
            delay = min([*known, now + STARTING_INTERVAL_S]) - time.monotonic()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, delay))


class LoadMonitor:
    def __init__(self, interval_s: float, timeout_s: float, registry: WorkerRegistry,
                 session: aiohttp.ClientSession, api_key: str | None) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.registry = registry
        self.session = session
        self.api_key = api_key

    async def poll(self, worker: Worker) -> None:
        try:
            async with self.session.get(worker.url + "/get_load", headers=_auth(self.api_key),
                                        timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    return
                data: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return
        if isinstance(data, list):  # one entry per data-parallel rank
            data = {"num_reqs": sum(int(d.get("num_reqs", 0)) for d in data if isinstance(d, dict))}
        if isinstance(data, dict):
            value = data.get("num_reqs", data.get("load", 0))
            worker.load = int(value) if isinstance(value, (int, float)) else 0
            adm = data.get("admission")  # a pdserve server's admission figures (router/admission.py)
            if isinstance(adm, dict):
                wait, held = adm.get("est_queue_wait_s"), adm.get("kv_held")
                worker.queue_wait_s = float(wait) if isinstance(wait, (int, float)) else None
                worker.kv_held = float(held) if isinstance(held, (int, float)) else None

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.poll(w) for w in self.registry.all() if w.healthy))
            await asyncio.sleep(self.interval_s)
