"""KV tiers below the device pool: their configuration, memory (host slots), copies and storage.

    device pool (KVPool) ── demote / backup ──▶ host tier (HostPool) ── write ──▶ storage (PageStore)
          ▲                                        │     ▲                             │
          └──────────── load (copy thread) ────────┘     └──── fetch (storage thread) ─┘

`KVTiers` owns no tree: the radix cache (radix.py, moves.py) decides what moves, applies results;
this module reserves nothing itself and runs the bytes. Copies between device and host run on
one thread (a CUDA stream of their own on GPUs), storage calls on another, so a slow or dead
store never delays a load. Lifecycle of a `Copy`: the cache reserves its pages/slots and locks
its nodes, `submit`s it; the thread runs it; `finished()` hands it back at the next poll and
the cache applies it (only then do its pages / slots change owner). Demotion on eviction is the
one synchronous copy (`copy_now`): a device page must hold its bytes until they are in host.

Write policies (SGLang's names), for pages computed on the device:
  write_through            every page inserted into the cache is copied to host at once (async)
                           and, once there, written to storage
  write_through_selective  only pages matched `hot_hits` times are; others are demoted to host
                           when evicted from the device and dropped from host without a write
  write_back               pages go to host when evicted from the device, to storage when
                           evicted from host
Prefetch policies, for a request whose prefix continues in storage: wait_complete (it waits
for the fetch), best_effort (it never waits; the fetch serves later requests), timeout (it waits
up to `prefetch_timeout_s`). A host hit is always loaded back before the request is admitted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_tiers.codec import Namespace
from pdserve.engine.kv_tiers.host_pool import HostPool
from pdserve.engine.kv_tiers.storage import BACKENDS, PageStore, StorageBackend
from pdserve.engine.kv_tiers.worker import Job, Worker
from pdserve.engine.prefix_cache import Node

WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
MAX_QUEUED_WRITE_BYTES = 256 << 20  # write-backs waiting for the storage thread; more are skipped (counted)


@dataclass(frozen=True)
class TierConfig:
    host_pages: int  # host-tier slots (pages)
    write_policy: str = "write_through"
    prefetch_policy: str = "best_effort"
    prefetch_timeout_s: float = 2.0
    storage_backend: str | None = None  # None | file | mooncake
    storage_extra: str = "{}"  # --hicache-storage-backend-extra-config (JSON text)
    hot_hits: int = 2  # write_through_selective: matches before a page is written through
    storage_retry_s: float = 2.0  # a store that is down is asked again after this long

    def __post_init__(self) -> None:
        if self.host_pages < 1:
            raise ValueError(f"the host KV tier needs at least 1 page, got {self.host_pages}")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write policy {self.write_policy!r} is not one of {', '.join(WRITE_POLICIES)}")
        if self.prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(f"prefetch policy {self.prefetch_policy!r} is not one of {', '.join(PREFETCH_POLICIES)}")
        if self.storage_backend is not None and self.storage_backend not in BACKENDS:
            raise ValueError(f"storage backend {self.storage_backend!r} is not one of {', '.join(BACKENDS)}")

    def extra(self) -> dict[str, object]:
        try:
            raw = json.loads(self.storage_extra or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"--hicache-storage-backend-extra-config is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("--hicache-storage-backend-extra-config must be a JSON object")
        return raw


def create_backend(name: str, extra: dict[str, object]) -> StorageBackend:
    """`--hicache-storage-backend NAME` with its extra config (a JSON object)."""
    if name == "file":
        from pdserve.engine.kv_tiers.file_store import FileStore

        return FileStore.from_extra(extra)
    if name == "mooncake":
        from pdserve.engine.kv_tiers.mooncake_store import MooncakeStore

        return MooncakeStore.from_extra(extra)
    raise ValueError(f"storage backend {name!r} is not one of {', '.join(BACKENDS)}")


def namespace_for(model: str, k: torch.Tensor, page_size: int, head_start: int = 0, num_heads: int = 0) -> Namespace:
    """The storage namespace of a device pool `k` ([layers, slots, heads, head_dim]) of `model`."""
    layers, _, heads, dim = k.shape
    return Namespace(model, str(k.dtype).removeprefix("torch."), page_size, f"2x{layers}x{page_size}x{heads}x{dim}",
                     head_start, num_heads or heads)


@dataclass
class TierCounters:
    """Pages moved between tiers, and how long loads took (engine thread only)."""

    backed_up: int = 0  # device -> host copies (write-through)
    demoted: int = 0  # device -> host at eviction
    dropped: int = 0  # left the device with no lower tier to go to
    loaded: int = 0  # host -> device (hits in the host tier)
    fetched: int = 0  # storage -> host (hits in storage)
    stored: int = 0  # host -> storage
    host_evicted: int = 0
    writes_skipped: int = 0  # write-backs dropped because the storage queue was full
    load_s: float = 0.0
    fetch_s: float = 0.0


@dataclass(eq=False)
class Copy:
    """One batch of pages moving between tiers (see the module docstring)."""

    kind: str  # backup (device->host) | load (host->device) | store (host->storage)
    #            | lookup (is it in storage?) then fetch (storage->host)
    nodes: list[Node] = field(default_factory=list)  # the nodes it moves (store / backup / load)
    pages: list[int] = field(default_factory=list)  # device pages, in order
    slots: list[int] = field(default_factory=list)  # host slots, in order
    hashes: list[int] = field(default_factory=list)  # page hashes (store / fetch)
    keys: list[tuple[int, ...]] = field(default_factory=list)  # fetch: each page's tokens
    anchor: Node | None = None  # load / fetch: the deepest node locked while it runs
    payloads: list[bytes] = field(default_factory=list)  # store of evicted pages: their bytes
    ok: list[bool] = field(default_factory=list)  # per page: it arrived
    t0: float = 0.0
    job: Job | None = None
    next: "Copy | None" = None  # a lookup's fetch (it takes over the anchor's lock)
    applied: bool = False  # the radix cache took its result (engine thread)
    keep: bool = False  # load / fetch: at apply, the lock on what arrived passes to the waiting request
    held: Node | None = None  # ... that node (the request's KV manager unlocks it)

    def last(self) -> "Copy":
        return self if self.next is None else self.next.last()


class KVTiers:
    def __init__(self, cfg: TierConfig, k: torch.Tensor, v: torch.Tensor, page_size: int,
                 ns: Namespace | None = None) -> None:
        self.cfg = cfg
        self.k, self.v = k, v
        self.host = HostPool(cfg.host_pages, k, page_size)
        self.store: PageStore | None = None
        if cfg.storage_backend is not None:
            assert ns is not None, "a storage tier needs the pages' namespace"
            backend = create_backend(cfg.storage_backend, cfg.extra())
            self.store = PageStore(backend, ns, self.host.slot_bytes, cfg.storage_retry_s)
        self.counters = TierCounters()
        self.stream = torch.cuda.Stream(k.device) if k.is_cuda else None
        self._copier = Worker("kv-tier-copy")
        self._io = Worker("kv-tier-storage")
        self.pages_in_flight = 0  # device pages reserved by loads not yet applied
        self.slots_in_flight = 0  # host slots reserved by fetches not yet applied
        self._jobs: dict[Job, Copy] = {}

    @property
    def pending(self) -> int:
        return self._copier.pending + self._io.pending

    # -- the engine thread ------------------------------------------------------------------
    def copy_now(self, pages: list[int], slots: list[int]) -> None:
        """Device pages -> host slots, done when this returns (demotion at eviction)."""
        self.host.copy_to_host(self.k, self.v, pages, slots)
        if self.stream is not None:
            torch.cuda.current_stream(self.k.device).synchronize()

    def submit(self, c: Copy) -> None:
        c.t0 = time.monotonic()
        if c.kind in ("backup", "load"):
            ready = None
            if self.stream is not None:  # the pages were written by kernels queued on the engine's stream
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.k.device))
            c.job = Job(lambda: self._device_copy(c, ready))
            self._copier.submit(c.job)
        else:
            c.job = Job(lambda: self._storage_io(c))
            self._io.submit(c.job)
        self._jobs[c.job] = c
        self.pages_in_flight += len(c.pages) if c.kind == "load" else 0
        self.slots_in_flight += len(c.slots) if c.kind == "fetch" else 0

    def write_back(self, page_hash: int, slot: int) -> bool:
        """Queue a page leaving the host tier for storage (its bytes copied now: the slot is freed)."""
        if self.store is None:
            return False
        if self._io.pending * self.host.slot_bytes >= MAX_QUEUED_WRITE_BYTES:
            self.counters.writes_skipped += 1
            return False
        self.submit(Copy("store", hashes=[page_hash], payloads=[bytes(self.host.payload(slot))]))
        return True

    def finished(self) -> list[Copy]:
        """Copies done since the last call, in the order each thread ran them."""
        out = []
        for job in [*self._copier.finished(), *self._io.finished()]:
            c = self._jobs.pop(job)
            if job.error is not None:
                c.ok = [False] * max(len(c.pages), len(c.slots), len(c.hashes))
            self.pages_in_flight -= len(c.pages) if c.kind == "load" else 0
            self.slots_in_flight -= len(c.slots) if c.kind == "fetch" else 0
            elapsed = time.monotonic() - c.t0
            if c.kind == "load":
                self.counters.load_s += elapsed
            elif c.kind in ("lookup", "fetch"):
                self.counters.fetch_s += elapsed
            out.append(c)
        return out

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until every submitted copy has finished (tests, flush, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while any(not j.done for j in self._jobs):
            if time.monotonic() > deadline:
                raise TimeoutError("KV tier copies did not finish")
            time.sleep(0.001)

    def close(self) -> None:
        self._copier.close()
        self._io.close()
        if self.store is not None:
            self.store.close()

    # -- the threads ------------------------------------------------------------------------
    def _device_copy(self, c: Copy, ready: "torch.cuda.Event | None") -> None:
        if self.stream is None:
            self._copy(c)
        else:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                self._copy(c)
            self.stream.synchronize()
        c.ok = [True] * len(c.pages)

    def _copy(self, c: Copy) -> None:
        if c.kind == "backup":
            self.host.copy_to_host(self.k, self.v, c.pages, c.slots)
        else:
            self.host.copy_to_device(self.k, self.v, c.slots, c.pages)

    def _storage_io(self, c: Copy) -> None:
        assert self.store is not None
        if c.kind == "store":
            payloads = c.payloads or [self.host.payload(s) for s in c.slots]
            c.ok = self.store.write(c.hashes, payloads)
            return
        if c.kind == "lookup":
            n = self.store.lookup(c.hashes)
            c.ok = [i < n for i in range(len(c.hashes))]
            return
        got = self.store.read(c.hashes)
        for slot, payload in zip(c.slots, got):
            self.host.fill(slot, payload)
        c.ok = [i < len(got) for i in range(len(c.slots))]
