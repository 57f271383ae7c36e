"""`pdserve router --discovery etcd://...`: the worker registry follows the servers registered in etcd.

Lifecycle of `DiscoveredWorkers` (built by the app when the config has `discovery`):
  - `start()` (in `RouterApp.start`, before the first round of health checks) starts a
    discovery `Watcher` (its own thread) whose changes are applied on the router's event loop,
    in order, and waits (bounded by the etcd timeout) for the first listing, so a router
    started next to running servers probes them with its first round and takes traffic at once;
  - `apply(change)` on the loop:
      added    a worker from the record, through the same path as `POST /workers`
               (`new_worker` + `registry.add`): the health checker is woken and probes it at
               once (a first good probe makes it routable and reads its /server_info, from
               which kv_sync subscribes to its KV events), its breaker starts closed;
      updated  replaced (removed, then added) when what routing uses changed (role, url,
               bootstrap host or port), else only its epoch is taken (a new epoch of the same shape);
      removed  `registry.remove`, as `DELETE /workers`: requests holding it finish, no new one
               picks it, policies forget it, health checks and the KV subscription stop;
    a worker's `epoch` is its record's: the PD legs sent to it carry it (router/pd.py);
    a record of the other mode (a unified server under a PD router, or the reverse) is skipped,
    and a URL given on the command line (or added by `POST /workers`) wins over a record;
  - `stop()` ends the watch (bounded, off the loop). Workers stay in the registry.
Two routers on one etcd apply the same records, so they converge on the same workers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pdserve.contract import WorkerRecord
from pdserve.discovery import REMOVED, Change, DiscoveryConfig, Watcher
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.metrics import RouterMetrics
from pdserve.router.workers import WorkerRegistry, new_worker

logger = logging.getLogger("pdserve.router")


def spec_of(record: WorkerRecord) -> WorkerSpec:
    """ValueError for a record no router can use (bad url, bootstrap fields on a non-prefill)."""
    return WorkerSpec(url=record.url, role=record.role, bootstrap_port=record.bootstrap_port,
                      bootstrap_host=record.bootstrap_host)


class DiscoveredWorkers:
    def __init__(self, cfg: RouterConfig, discovery: DiscoveryConfig, registry: WorkerRegistry,
                 metrics: RouterMetrics) -> None:
        self.cfg = cfg
        self.discovery = discovery
        self.registry = registry
        self.metrics = metrics
        self.specs: dict[str, WorkerSpec] = {}  # etcd key -> the spec this router runs for it
        self.roles = ("prefill", "decode") if cfg.pd else ("regular",)
        self._skipped: set[str] = set()  # keys already logged as skipped
        self._watcher: Watcher | None = None

    @property
    def connected(self) -> bool:
        return self._watcher is not None and self._watcher.connected

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._watcher = Watcher(self.discovery, lambda change: loop.call_soon_threadsafe(self.apply, change))
        self._watcher.start()
        synced = await asyncio.to_thread(self._watcher.synced.wait, 2 * self.discovery.timeout_s + 1)
        if not synced:
            logger.warning("discovery: etcd %s has not answered yet; workers join when it does", self.discovery.url)
        logger.info("discovery: following %s (%d workers)", self.discovery.url, len(self.specs))

    async def stop(self) -> None:
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)

    def _skip(self, key: str, why: str) -> None:
        if key not in self._skipped:
            self._skipped.add(key)
            logger.warning("discovery: not using %s: %s", key, why)

    def apply(self, change: Change) -> None:
        self.metrics.discovery_change(change.kind)
        if change.kind == REMOVED:
            self._remove(change.key, "deregistered or its lease expired")
            return
        rec = change.record
        if rec.role not in self.roles:
            self._remove(change.key, f"now a {rec.role} worker")
            return self._skip(change.key, f"a {rec.role} worker under a {'PD' if self.cfg.pd else 'regular'} router")
        try:
            spec = spec_of(rec)
        except ValueError as exc:
            self._remove(change.key, str(exc))
            return self._skip(change.key, str(exc))
        if self.specs.get(change.key) == spec:
            held = self.registry.get(spec.url)
            if held is not None:
                held.epoch = rec.epoch  # same shape, e.g. a new epoch: nothing else to change
            return
        self._remove(change.key, f"registered again as {spec.role} {spec.url}")
        other = self.registry.get(spec.url)
        if other is not None:
            return self._skip(change.key, f"{spec.url} is already a {other.role} worker given to the router")
        self._skipped.discard(change.key)
        self.specs[change.key] = spec
        worker = new_worker(spec, self.cfg)
        worker.epoch = rec.epoch
        self.registry.add(worker)
        logger.info("discovery: %s worker %s joined (model %s, epoch %d)", spec.role, spec.url, rec.model, rec.epoch)

    def _remove(self, key: str, why: str) -> None:
        spec = self.specs.pop(key, None)
        if spec is not None and self.registry.remove(spec.url) is not None:
            logger.info("discovery: %s worker %s left (%s)", spec.role, spec.url, why)

    def describe(self) -> dict[str, Any]:
        w = self._watcher
        return {"url": self.discovery.url, "connected": self.connected, "rewatches": w.rewatches if w else 0,
                "workers": sorted(s.url for s in self.specs.values())}
