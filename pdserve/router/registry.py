"""The set of workers, by role, with change listeners.

Lifecycle: filled from the config at start, changed at runtime by `POST/DELETE /workers`.
Lists per role are rebuilt on every change (rare) so the per-request `routable(role)` is a
plain filter over a short list. Listeners (policies' trees, the health checker) hear of
additions and removals.
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.router.worker import Worker

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
