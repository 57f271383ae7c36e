"""The etcd calls discovery makes, through etcd3gw (etcd's v3 HTTP/JSON gateway; pinned in pyproject.toml).

`EtcdStore` is one client (one requests session): use it from one thread. Every failure of
etcd or of the connection to it is a `StoreError`; callers retry on their own schedule.

    identity()          cluster, member, raft term and current revision (`/maintenance/status`)
    grant(ttl) -> id    a lease;  refresh(id) -> TTL left (<= 0: the lease is gone);  revoke(id)
    put(key, v, lease)  list(prefix) -> {key: value};  delete(key)
    watch(prefix, from_revision, on_event) -> Watch    (events of the range, in revision order)

A watch runs etcd3gw's stream reader in its own thread and hands each event to `on_event`
(from that thread). etcd3gw does not say when a stream ends (etcd stopped or restarted):
`Watch.open()` reads the stream's socket state, and the watcher (watcher.py) also checks
`identity()` every second, so a lost stream is noticed either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.discovery.config import DiscoveryConfig

logger = logging.getLogger("pdserve.discovery")


def _failures() -> tuple[type[BaseException], ...]:
    """What a failed call raises. etcd3gw and requests are imported on first use (~0.2 s): building
    `pdserve`'s parser, which sees the discovery flags, does not pay for them."""
    import requests
    from etcd3gw.exceptions import Etcd3Exception

    return Etcd3Exception, requests.RequestException, ValueError, KeyError, TypeError


def _range_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with `prefix` (its last byte + 1)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class StoreError(RuntimeError):
    """etcd is unreachable or refused a call."""


@dataclass(frozen=True)
class Identity:
    cluster_id: str
    member_id: str
    raft_term: int
    revision: int

    def same_server(self, other: Identity) -> bool:
        """False after a restart (a new term; a new member or cluster if its data was wiped)."""
        return (self.cluster_id, self.member_id, self.raft_term) == (other.cluster_id, other.member_id,
                                                                       other.raft_term)


@dataclass(frozen=True)
class StoreEvent:
    key: str
    value: bytes | None  # None: deleted (also when its lease expired)
    revision: int


class Watch:
    def __init__(self, gateway: Any) -> None:  # an etcd3gw.watch.Watcher
        self._gateway = gateway

    def open(self) -> bool:
        """False once the stream has ended (best effort: the response's socket state)."""
        raw = getattr(getattr(self._gateway, "_response", None), "raw", None)
        return raw is None or not raw.closed

    def cancel(self) -> None:
        try:
            self._gateway.stop()
        except Exception:  # a stream already broken may fail to close: nothing left to free
            logger.debug("closing a watch stream failed", exc_info=True)


class EtcdStore:
    def __init__(self, cfg: DiscoveryConfig) -> None:
        import etcd3gw

        self.cfg = cfg
        self._etcd3gw = etcd3gw
        self._failures = _failures()
        self._client = etcd3gw.client(host=cfg.host, port=cfg.port, timeout=cfg.timeout_s)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._failures as exc:
            raise StoreError(f"etcd {self.cfg.host}:{self.cfg.port} {what}: {type(exc).__name__}: {exc}") from None

    def identity(self) -> Identity:
        status = self._call("status", self._client.status)
        header = status["header"]
        return Identity(str(header.get("cluster_id")), str(header.get("member_id")),
                        int(header.get("raft_term", 0)), int(header.get("revision", 0)))

    def grant(self, ttl_s: int) -> int:
        return int(self._call("lease grant", lambda: self._client.lease(ttl_s)).id)

    def refresh(self, lease_id: int) -> int:
        return int(self._call("lease keepalive", self._etcd3gw.Lease(lease_id, self._client).refresh))

    def revoke(self, lease_id: int) -> None:
        self._call("lease revoke", self._etcd3gw.Lease(lease_id, self._client).revoke)

    def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        lease = self._etcd3gw.Lease(lease_id, self._client) if lease_id is not None else None
        self._call("put", lambda: self._client.put(key, value, lease=lease))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self._client.delete(key))

    def list(self, prefix: str) -> dict[str, bytes]:
        items = self._call("range", lambda: self._client.get_prefix(prefix))
        return {meta["key"].decode(): bytes(value) for value, meta in items}

    def watch(self, prefix: str, from_revision: int, on_event: Callable[[StoreEvent], None]) -> Watch:
        def deliver(event: dict[str, Any]) -> None:
            kv = event["kv"]
            deleted = event.get("type") == "DELETE"
            on_event(StoreEvent(kv["key"].decode(), None if deleted else bytes(kv.get("value", b"")),
                                int(kv.get("mod_revision", 0))))

        from etcd3gw.watch import Watcher as GatewayWatcher

        return Watch(self._call("watch", lambda: GatewayWatcher(
            self._client, prefix, deliver, start_revision=from_revision, range_end=_range_end(prefix))))

    def close(self) -> None:
        self._client.session.close()
