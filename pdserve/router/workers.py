"""The workers as the router sees them: one `Worker` each, and the `WorkerRegistry` that holds them by role.

Worker lifecycle: created from a `WorkerSpec` when the router starts, on `POST /workers`, or
when discovery (router/discovery.py) sees a server register;
the health checker moves `healthy` (it starts False until a first successful check, or True
when health checks are off); requests bump `in_flight` while they run and report their
outcome to the worker's circuit breaker; the load monitor refreshes `load` from the worker's
`/get_load`; `removed` is set by `DELETE /workers` so that requests still holding the object
finish but no new one picks it (discovery removes the same way when a record goes). `epoch` is
the worker's role epoch as its discovery record or /server_info says (None: unknown); a leg that
answered 409 `stale_epoch` marks the worker `stale` (not routable) until the health checker has
read its /server_info again and its mode still fits its role (router/health.py).

Registry: filled from the config at start, changed at runtime by `POST/DELETE /workers` and discovery.
Lists per role are rebuilt on every change (rare) so the per-request `routable(role)` is a
plain filter over a short list. Listeners (policies' trees, the health checker) hear of
additions and removals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pdserve.contract import ServerInfo
from pdserve.router.config import CircuitConfig, RouterConfig, WorkerSpec
from pdserve.router.resilience import CircuitBreaker


class Worker:
    __slots__ = ("bootstrap_host", "bootstrap_port", "breaker", "epoch", "ever_healthy", "fwd_headers",
                 "health_failures", "health_successes", "healthy", "host", "in_flight", "info", "kv_held",
                 "last_error", "load", "port", "processed", "queue_wait_s", "removed", "role", "stale", "url")

    def __init__(self, spec: WorkerSpec, circuit: CircuitConfig, api_key: str | None, healthy: bool) -> None:
        self.url = spec.url
        self.role = spec.role
        parts = urlsplit(spec.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.bootstrap_host = spec.bootstrap_host or self.host
        self.bootstrap_port = spec.bootstrap_port
        self.breaker = CircuitBreaker(circuit, name=f"{spec.url} ({spec.role})")
        self.healthy = healthy
        self.ever_healthy = healthy
        self.health_failures = 0
        self.health_successes = 0
        self.in_flight = 0
        self.load = 0
        self.queue_wait_s: float | None = None  # its admission figures from /get_load (router/admission.py)
        self.kv_held: float | None = None
        self.processed = 0
        self.removed = False
        self.last_error: str | None = None
        self.info: ServerInfo | None = None  # its /server_info, once read
        self.epoch: int | None = None  # its role epoch (discovery record or /server_info)
        self.stale = False  # it answered a leg 409 stale_epoch: out until its /server_info is read again
        auth = f"authorization: Bearer {api_key}\r\n" if api_key else ""
        self.fwd_headers = f"content-type: application/json\r\n{auth}".encode("latin-1")

    def routable(self) -> bool:
        return self.healthy and not self.removed and not self.stale and self.breaker.allow()

    def record(self, success: bool, error: str | None = None) -> None:
        self.breaker.record(success)
        if not success:
            self.last_error = error

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "bootstrap_port": self.bootstrap_port,
                "healthy": self.healthy, "circuit": self.breaker.state, "in_flight": self.in_flight,
                "load": self.load, "processed": self.processed, "last_error": self.last_error, "epoch": self.epoch,
                "stale": self.stale}


def new_worker(spec: WorkerSpec, cfg: RouterConfig) -> Worker:
    """A worker as this router runs it: its breaker and key from `cfg`, healthy at once only without checks."""
    return Worker(spec, cfg.circuit, cfg.worker_key, healthy=not cfg.health.enabled)


Listener = Callable[[str, Worker], None]  # ("added" | "removed", worker)


class WorkerRegistry:
    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._by_role: dict[str, list[Worker]] = {"regular": [], "prefill": [], "decode": []}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _rebuild(self) -> None:
        self._by_role = {role: [w for w in self._workers.values() if w.role == role]
                         for role in ("regular", "prefill", "decode")}

    def add(self, worker: Worker) -> None:
        if worker.url in self._workers:
            raise KeyError(worker.url)
        self._workers[worker.url] = worker
        self._rebuild()
        for listener in self._listeners:
            listener("added", worker)

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url, None)
        if worker is None:
            return None
        worker.removed = True
        self._rebuild()
        for listener in self._listeners:
            listener("removed", worker)
        return worker

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def by_role(self, role: str) -> list[Worker]:
        return self._by_role[role]

    def routable(self, role: str) -> list[Worker]:
        return [w for w in self._by_role[role] if w.routable()]

    def has_routable(self, role: str) -> bool:
        return any(w.routable() for w in self._by_role[role])
