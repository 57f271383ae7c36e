"""A server's entry in the discovery store: its record under a lease it keeps alive.

Lifecycle of `Registration` (one thread owns the etcd client):

    start() ─▶ grant lease (TTL ttl_s) + put record ─▶ refresh every keepalive_s ─┐
                  ▲                                                            │
                  └── lease gone (TTL <= 0: it expired while etcd was away, or ┘
                      etcd came back empty) ─▶ a new lease, the record again
    etcd unreachable: keep the lease id and retry each period (one warning per outage)
    update(record): the new record goes in under the same lease at the next beat
    stop(): the thread revokes the lease (the key goes at once) and ends; bounded

A process that dies without stop() stops refreshing: etcd deletes the key when the lease
expires, ttl_s later, and every watcher sees the deletion.
"""

from __future__ import annotations

import logging
import threading

from pdserve.contract.worker import WorkerRecord, encode_record
from pdserve.discovery.config import DiscoveryConfig
from pdserve.discovery.store import EtcdStore, StoreError

logger = logging.getLogger("pdserve.discovery")


class Registration:
    def __init__(self, cfg: DiscoveryConfig, record: WorkerRecord) -> None:
        self.cfg = cfg
        self.key = cfg.key_for(record.url)
        self._record = record
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.registered = threading.Event()  # set once the record is in etcd
        self.registrations = 0  # records written under a new lease (1 + re-registrations)
        self.lease_id: int | None = None
        self._thread = threading.Thread(target=self._run, name="pdserve-registration", daemon=True)

    @property
    def record(self) -> WorkerRecord:
        return self._record

    def start(self) -> Registration:
        self._thread.start()
        return self

    def update(self, record: WorkerRecord) -> None:
        if self.cfg.key_for(record.url) != self.key:
            raise ValueError("a registration keeps its url; register the new address separately")
        with self._lock:
            self._record, self._dirty = record, True

    def stop(self, timeout: float | None = None) -> None:
        """Deregister (revoke the lease) and end the thread; waits at most `timeout` (default: two etcd calls)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout if timeout is not None else 2 * self.cfg.timeout_s + 0.5)

    def _beat(self, store: EtcdStore) -> None:
        if self.lease_id is not None and store.refresh(self.lease_id) <= 0:
            logger.warning("lease of %s is gone (etcd restarted empty, or it expired while etcd was away): "
                           "registering again", self.key)
            self.lease_id = None
        with self._lock:
            record, dirty = self._record, self._dirty
        if self.lease_id is None:
            lease = store.grant(self.cfg.ttl_s)
            store.put(self.key, encode_record(record), lease)
            self.lease_id = lease
            self.registrations += 1
            self.registered.set()
            logger.info("registered %s as %s in %s (lease %x, TTL %d s)", record.url, record.role, self.cfg.url,
                        lease, self.cfg.ttl_s)
        elif dirty:
            store.put(self.key, encode_record(record), self.lease_id)
        else:
            return
        with self._lock:
            self._dirty = self._record is not record  # an update() that came meanwhile goes at the next beat

    def _run(self) -> None:
        store = EtcdStore(self.cfg)
        down = False
        try:
            while not self._stop.is_set():
                try:
                    self._beat(store)
                    if down:
                        logger.info("etcd %s is back: %s is registered", self.cfg.url, self.key)
                    down = False
                except StoreError as exc:
                    if not down:
                        logger.warning("discovery: %s (retrying every %.1f s)", exc, self.cfg.keepalive_s)
                    down = True
                self._stop.wait(self.cfg.keepalive_s)
            if self.lease_id is not None:
                store.revoke(self.lease_id)
                logger.info("deregistered %s from %s", self.key, self.cfg.url)
        except StoreError as exc:
            logger.warning("discovery: could not deregister %s (its lease expires in %d s): %s", self.key,
                           self.cfg.ttl_s, exc)
        finally:
            self.lease_id = None
            store.close()
