"""Following the workers registered under a prefix: added / updated / removed records, across etcd restarts.

Lifecycle of `Watcher` (one thread owns the etcd client and the known set; `on_change` is
called from it, in order):

    connect: identity() (revision R) ─▶ list(prefix) ─▶ reconcile with what is known ─▶ watch from R + 1
       ▲        (events after R are replayed: a put already listed is no change, a delete of an
       │         unknown key is none either, so nothing between the list and the watch is lost)
       │
    serve:  apply each event (put: added / updated, delete: removed); every check_interval_s:
       │    the stream still open? identity() answers, same term and member? pending removals due?
       └─── any "no" (etcd down, restarted, wiped; stream ended) ─▶ back off 0.5 s, connect again

Known workers stay while etcd is away: their servers still run and the router's health checks
still judge them. A key missing from the list after a reconnect is not removed at once: it is
pending for its record's lease TTL plus one check, the time its server needs to notice a lost
lease and register again (an etcd restarted empty); if it comes back meanwhile nothing
changes. A deletion seen by the watch (clean stop, lease expired) removes at once.
`synced` is set after the first successful list; `rewatches` counts connects after the first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.contract.worker import WorkerRecord, decode_record
from pdserve.discovery.config import DiscoveryConfig
from pdserve.discovery.store import EtcdStore, Identity, StoreError, StoreEvent, Watch

logger = logging.getLogger("pdserve.discovery")
RECONNECT_S = 0.5
ADDED, UPDATED, REMOVED = "added", "updated", "removed"


@dataclass(frozen=True)
class Change:
    kind: str  # added | updated | removed
    key: str
    record: WorkerRecord  # removed: the last record known


class Watcher:
    def __init__(self, cfg: DiscoveryConfig, on_change: Callable[[Change], None]) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.known: dict[str, WorkerRecord] = {}  # read from other threads only as a copy (records())
        self._pending: dict[str, float] = {}  # key -> monotonic deadline of its removal
        self._events: queue.Queue[StoreEvent] = queue.Queue()
        self._stop = threading.Event()
        self.synced = threading.Event()
        self.connected = False
        self.rewatches = 0
        self._thread = threading.Thread(target=self._run, name="pdserve-discovery-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout if timeout is not None else self.cfg.timeout_s + self.cfg.check_interval_s + 1)

    def records(self) -> dict[str, WorkerRecord]:
        return dict(self.known)

    # -- the known set ------------------------------------------------------------------------
    def _emit(self, kind: str, key: str, record: WorkerRecord) -> None:
        try:
            self.on_change(Change(kind, key, record))
        except Exception:  # a consumer's bug must not stop discovery
            logger.exception("discovery: handling %s %s failed", kind, key)

    def _put(self, key: str, value: bytes) -> None:
        try:
            record = decode_record(value)
        except ValueError as exc:
            logger.warning("discovery: ignoring %s: not a worker record (%s)", key, exc)
            return self._delete(key)
        self._pending.pop(key, None)
        old = self.known.get(key)
        if old == record:
            return
        self.known[key] = record
        self._emit(ADDED if old is None else UPDATED, key, record)

    def _delete(self, key: str) -> None:
        self._pending.pop(key, None)
        old = self.known.pop(key, None)
        if old is not None:
            self._emit(REMOVED, key, old)

    def _reconcile(self, listed: dict[str, bytes]) -> None:
        for key, value in listed.items():
            self._put(key, value)
        now = time.monotonic()
        for key, record in self.known.items():
            if key not in listed and key not in self._pending:
                self._pending[key] = now + record.lease_ttl_s + self.cfg.check_interval_s
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, deadline in self._pending.items() if deadline <= now]:
            logger.info("discovery: %s did not come back after etcd returned: removed", key)
            self._delete(key)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            store = EtcdStore(self.cfg)
            try:
                self._serve(store, first)
            except StoreError as exc:
                if self.connected or first:
                    logger.warning("discovery: %s (watching again when it answers)", exc)
            finally:
                store.close()
            if self.connected:
                self.connected = False
            first = False
            self._stop.wait(RECONNECT_S)

    def _serve(self, store: EtcdStore, first: bool) -> None:
        ident = store.identity()
        listed = store.list(self.cfg.workers_prefix)
        while not self._events.empty():  # left from a broken stream: the list supersedes them
            self._events.get_nowait()
        self._reconcile(listed)
        watch = store.watch(self.cfg.workers_prefix, ident.revision + 1, self._events.put)
        try:
            self.connected = True
            if not first:
                self.rewatches += 1
                logger.info("discovery: watching %s again (%d workers)", self.cfg.url, len(self.known))
            self.synced.set()
            self._follow(store, watch, ident)
        finally:
            watch.cancel()

    def _follow(self, store: EtcdStore, watch: Watch, ident: Identity) -> None:
        next_check = time.monotonic() + self.cfg.check_interval_s
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=max(0.0, min(next_check - time.monotonic(), 0.2)))
                if event.value is None:
                    self._delete(event.key)
                else:
                    self._put(event.key, event.value)
            except queue.Empty:
                pass
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + self.cfg.check_interval_s
            self._expire()
            if not watch.open():
                raise StoreError("the watch stream ended")
            now = store.identity()
            if not now.same_server(ident):
                raise StoreError(f"etcd restarted (raft term {ident.raft_term} -> {now.raft_term})")
