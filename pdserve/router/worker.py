"""One worker as the router sees it: address, role, health, load and circuit breaker.

Lifecycle: created from a `WorkerSpec` when the router starts or on `POST /workers`; the
health checker moves `healthy` (it starts False until a first successful check, or True when
health checks are off); requests bump `in_flight` while they run and report their outcome to
the breaker; the load monitor refreshes `load` from the worker's `/get_load`; `removed` is set
by `DELETE /workers` so that requests still holding the object finish but no new one picks it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pdserve.router.circuit_breaker import CircuitBreaker
from pdserve.router.config import CircuitConfig, WorkerSpec


class Worker:
    __slots__ = ("bootstrap_host", "bootstrap_port", "breaker", "ever_healthy", "fwd_headers", "health_failures",
                 "health_successes", "healthy", "host", "in_flight", "info", "last_error", "load", "port",
                 "processed", "removed", "role", "url")

    def __init__(self, spec: WorkerSpec, circuit: CircuitConfig, api_key: str | None, healthy: bool) -> None:
        self.url = spec.url
        self.role = spec.role
        parts = urlsplit(spec.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.bootstrap_host = self.host
        self.bootstrap_port = spec.bootstrap_port
        self.breaker = CircuitBreaker(circuit)
        self.healthy = healthy
        self.ever_healthy = healthy
        self.health_failures = 0
        self.health_successes = 0
        self.in_flight = 0
        self.load = 0
        self.processed = 0
        self.removed = False
        self.last_error: str | None = None
        self.info: dict[str, Any] = {}
        auth = f"authorization: Bearer {api_key}\r\n" if api_key else ""
        self.fwd_headers = f"content-type: application/json\r\n{auth}".encode("latin-1")

    def routable(self) -> bool:
        return self.healthy and not self.removed and self.breaker.allow()

    def record(self, success: bool, error: str | None = None) -> None:
        self.breaker.record(success)
        if not success:
            self.last_error = error

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "bootstrap_port": self.bootstrap_port,
                "healthy": self.healthy, "circuit": self.breaker.state, "in_flight": self.in_flight,
                "load": self.load, "processed": self.processed, "last_error": self.last_error}
