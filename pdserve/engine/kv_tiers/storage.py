"""The storage tier: one interface over the backends, pages framed and checked, faults as misses.

Lifecycle of a page in storage (all calls on the tiers' storage thread, never the engine step):
  write  → `PageStore.write(hashes, payloads)`: each page framed (codec.py: header + checksum)
           and put under its content key; a page already there is a success (same content).
  lookup → `PageStore.lookup(hashes)`: how many leading pages of a chain the store holds.
  read   → `PageStore.read(hashes)`: the leading run of pages that exist AND pass every check;
           a missing, truncated or corrupt page ends the run (a miss: recomputed, never used).
A backend raises `StorageDown` when it cannot reach its store (directory gone, master away):
the store then answers every call as a miss / skipped write for `retry_s` seconds with one log
line, and the first call after that tries again (one more line when it answers: picked up).
A full store evicts (file: LRU under its size cap; mooncake: the master's eviction); a write
that still does not fit is a failed write, never a failed request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from pdserve.engine.kv_tiers.codec import BadPage, Namespace, frame_page, open_page

log = logging.getLogger(__name__)
T = TypeVar("T")

class StorageDown(RuntimeError):
    """The backend cannot reach its store at all (not one page's problem)."""


class StorageBackend(Protocol):
    """Bytes under string keys. Batch calls: one answer per key, in order."""

    name: str

    def put(self, keys: list[str], values: list[bytes]) -> list[bool]: ...

    def get(self, keys: list[str]) -> list[bytes | None]: ...

    def exists(self, keys: list[str]) -> list[bool]: ...

    def close(self) -> None: ...


@dataclass
class StorageCounters:
    """What the storage tier did (read by the engine thread; written by the storage thread)."""

    pages_read: int = 0
    bytes_read: int = 0
    pages_written: int = 0
    bytes_written: int = 0
    write_failures: int = 0  # puts the store refused (full, ...) or skipped while it was down
    misses: int = 0  # lookups/reads that ended a run on a page that is not there
    bad_pages: dict[str, int] = field(default_factory=dict)  # reason -> count (corrupt, truncated, ...)
    outages: int = 0  # times the backend went down
    down: bool = False


def parse_size(value: int | float | str, what: str) -> int:
    """Bytes from 1234, "64mb", "4gb", "1.5g" (SGLang's / Mooncake's spellings)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{what}: {value!r} is not a size")
    s = value.strip().lower()
    for suffix, mult in (("kb", 1 << 10), ("mb", 1 << 20), ("gb", 1 << 30), ("tb", 1 << 40), ("k", 1 << 10),
                         ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40), ("b", 1)):
        if s.endswith(suffix):
            s, scale = s[: -len(suffix)].strip(), mult
            break
    else:
        scale = 1
    try:
        return int(float(s) * scale)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a size") from None


class PageStore:
    """A backend behind the page codec and an outage breaker (see the module docstring)."""

    def __init__(self, backend: StorageBackend, ns: Namespace, page_bytes: int, retry_s: float = 2.0,
                 batch_pages: int = 32, counters: StorageCounters | None = None) -> None:
        self.backend = backend
        self.ns = ns
        self.page_bytes = page_bytes
        self.retry_s = retry_s
        self.batch_pages = batch_pages
        self.counters = counters if counters is not None else StorageCounters()
        self.counters.down = False
        self._down_until = 0.0

    def _guarded(self, what: str, call: Callable[[], T], fallback: T) -> T:
        c = self.counters
        if c.down and time.monotonic() < self._down_until:
            return fallback
        try:
            out = call()
        except (StorageDown, OSError, RuntimeError) as exc:
            self._down_until = time.monotonic() + self.retry_s
            if not c.down:
                c.down, c.outages = True, c.outages + 1
                log.warning("KV storage %s is unreachable (%s: %s): reads are misses and writes are skipped; "
                            "retrying every %.0f s", self.backend.name, what, exc, self.retry_s)
            return fallback
        if c.down:
            c.down = False
            log.warning("KV storage %s answers again: reads and writes resume", self.backend.name)
        return out

    def write(self, hashes: list[int], payloads: list[bytes | memoryview]) -> list[bool]:
        """Store each page under its key; one success flag per page."""
        assert len(hashes) == len(payloads)
        done: list[bool] = []
        for i in range(0, len(hashes), self.batch_pages):
            hs, ps = hashes[i:i + self.batch_pages], payloads[i:i + self.batch_pages]
            keys = [self.ns.key(h) for h in hs]
            framed = [frame_page(self.ns, h, p) for h, p in zip(hs, ps)]
            ok = self._guarded("put", lambda: self.backend.put(keys, framed), [False] * len(keys))
            done += ok
            self.counters.pages_written += sum(ok)
            self.counters.bytes_written += sum(len(f) for f, o in zip(framed, ok) if o)
            self.counters.write_failures += len(ok) - sum(ok)
        return done

    def lookup(self, hashes: list[int]) -> int:
        """How many leading pages of the chain the store says it holds (not yet checked)."""
        n = 0
        for i in range(0, len(hashes), self.batch_pages):
            keys = [self.ns.key(h) for h in hashes[i:i + self.batch_pages]]
            there = self._guarded("exists", lambda: self.backend.exists(keys), [False] * len(keys))
            run = next((j for j, t in enumerate(there) if not t), len(there))
            n += run
            if run < len(there):
                self.counters.misses += 1
                break
        return n

    def read(self, hashes: list[int]) -> list[memoryview]:
        """Payloads of the leading run of `hashes` that is present and passes every check."""
        out: list[memoryview] = []
        for i in range(0, len(hashes), self.batch_pages):
            hs = hashes[i:i + self.batch_pages]
            keys = [self.ns.key(h) for h in hs]
            got = self._guarded("get", lambda: self.backend.get(keys), [None] * len(keys))
            for h, data in zip(hs, got):
                try:
                    payload = open_page(self.ns, h, data, self.page_bytes)
                except BadPage as exc:
                    reason = str(exc).split(" ")[0].rstrip(":")
                    if reason == "missing":
                        self.counters.misses += 1
                    else:
                        self.counters.bad_pages[reason] = self.counters.bad_pages.get(reason, 0) + 1
                        log.warning("KV storage %s: page %016x is unusable (%s): a miss", self.backend.name, h, exc)
                    return out
                out.append(payload)
                self.counters.pages_read += 1
                self.counters.bytes_read += len(data or b"")
        return out

    def close(self) -> None:
        self.backend.close()

