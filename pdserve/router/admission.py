"""The router's admission control: refuse (503 + Retry-After) what no worker can serve in time.

The workers' own admission (server/admission.py) is exact; this is the cluster's first look,
before any worker is bothered, from what the load monitor last read of each worker's /get_load
(`admission`: its predicted queue wait and the share of its KV pool that requests hold), and
the request's TTFT deadline (contract.TTFT_DEADLINE, what is left of it). Per request:

    kv          every routable decode (regular mode: worker) holds more than max_kv_usage
    queue_wait  every routable prefill (regular: worker) predicts a queue longer than max_queue_wait_s
    deadline    every routable prefill (regular: worker) predicts a queue longer than the time left

A worker that reported nothing yet counts as free. A refusal is counted in
`<prefix>_router_rejected_total{reason}` ("admission_kv", ...). The router's concurrency queue
(429 when full, 408 after its timeout) stays the outer guard; a worker's own 503 is relayed
with its Retry-After. `deadline_left_s` reads the deadline of a body (and says what to forward).
"""

from __future__ import annotations

import math
import time
from dataclasses import fields, replace
from typing import Any

from pdserve.contract import TTFT_DEADLINE
from pdserve.router.config import AdmissionConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.request import RouterError
from pdserve.router.workers import WorkerRegistry


def deadline_left_s(body: dict[str, Any], t0: float) -> float | None:
    """Seconds left of the body's TTFT deadline (`t0`: when the router read it), None without one;
    a deadline already past is a 503 now (dropped before any prefill)."""
    ms = body.get(TTFT_DEADLINE)
    if ms is None:
        return None
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0 < ms < 1e9:
        raise RouterError(400, f"{TTFT_DEADLINE} must be a number of milliseconds in (0, 1e9)", param=TTFT_DEADLINE)
    left = ms / 1000.0 - (time.perf_counter() - t0)
    if left <= 0:
        raise RouterError(503, "deadline exceeded: the request waited past its TTFT deadline in the router",
                          code="deadline_exceeded", headers=[("retry-after", "1")])
    return left


def with_deadline_left(body: dict[str, Any], left: float | None) -> dict[str, Any]:
    """The body a worker gets: its deadline is what is left of the client's."""
    return body if left is None else {**body, TTFT_DEADLINE: left * 1000.0}


class RouterAdmission:
    def __init__(self, config: AdmissionConfig, registry: WorkerRegistry, metrics: RouterMetrics, pd: bool) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.compute_role, self.memory_role = ("prefill", "decode") if pd else ("regular", "regular")

    def check(self, left_s: float | None) -> None:
        """Raise the 503 when no worker can take the request (module docstring)."""
        cfg = self.config
        if not cfg.enabled:
            return
        mem = self.registry.routable(self.memory_role)
        if mem and all(w.kv_held is not None and w.kv_held > cfg.max_kv_usage for w in mem):
            self._refuse("kv", f"every {self.memory_role} holds more than {cfg.max_kv_usage:.0%} of its KV cache",
                         cfg.retry_after_s)
        waits = [w.queue_wait_s or 0.0 for w in self.registry.routable(self.compute_role)]
        best = min(waits) if waits else 0.0
        if cfg.max_queue_wait_s is not None and best > cfg.max_queue_wait_s:
            self._refuse("queue_wait", f"every {self.compute_role}'s queue is predicted to take over "
                                       f"{cfg.max_queue_wait_s:g} s", best - cfg.max_queue_wait_s)
        if left_s is not None and best > left_s:
            self._refuse("deadline", f"the shortest {self.compute_role} queue ({best:.2f} s) ends after its TTFT "
                                     "deadline", best, code="deadline_exceeded")

    def _refuse(self, reason: str, message: str, wait_s: float, code: str = "overloaded") -> None:
        self.metrics.rejected.labels(f"admission_{reason}").inc()
        retry = max(1, math.ceil(max(self.config.retry_after_s, min(wait_s, 60.0))))
        raise RouterError(503, f"cluster overloaded: {message}; retry later", code=code,
                          headers=[("retry-after", str(retry))])

    def describe(self) -> dict[str, Any]:
        workers = {w.url: {"queue_wait_s": w.queue_wait_s, "kv_held": w.kv_held} for w in self.registry.all()}
        return {**{f.name: getattr(self.config, f.name) for f in fields(self.config)}, "workers": workers}

    def update(self, values: dict[str, Any]) -> None:
        """Apply the admin API's JSON (ValueError names a bad field)."""
        known = {f.name for f in fields(self.config)}
        bad = [k for k, v in values.items() if k not in known or isinstance(v, (str, list, dict))]
        if bad:
            raise ValueError(f"admission: bad field(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
        self.config = replace(self.config, **values)
