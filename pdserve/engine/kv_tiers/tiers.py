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

import time
from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_tiers.codec import Namespace
from pdserve.engine.kv_tiers.host_pool import HostPool
from pdserve.engine.config import HiCacheConfig, ParallelConfig
from pdserve.engine.kv_tiers.backends import create_backend
from pdserve.engine.kv_tiers.storage import PageStore, StorageCounters
from pdserve.engine.kv_tiers.worker import Job, Worker
from pdserve.engine.prefix_cache import Node
from pdserve.kv_events import MEDIUM_DISK, MEDIUM_EXTERNAL

MAX_QUEUED_WRITE_BYTES = 256 << 20  # write-backs waiting for the storage thread; more are skipped (counted)


@dataclass(frozen=True)
class TierConfig:
    """The tiers as the engine runs them: HiCacheConfig (engine/config.py) with the host tier sized."""

    host_pages: int  # host-tier slots (pages)
    write_policy: str = "write_through"
    prefetch_policy: str = "timeout"
    prefetch_timeout_s: float = 1.0
    storage_backend: str | None = None  # None | file | mooncake
    storage_extra: str | None = None  # --hicache-storage-backend-extra-config (JSON text)
    hot_hits: int = 2  # write_through_selective: matches before a page is written through
    storage_retry_s: float = 2.0  # a store that is down is asked again after this long
    write_finished: bool = False  # a PD decode: finished requests' pages go to storage under any policy

    def __post_init__(self) -> None:
        if self.host_pages < 1:
            raise ValueError(f"the host KV tier needs at least 1 page, got {self.host_pages}")
        HiCacheConfig(enable=True, write_policy=self.write_policy, prefetch_policy=self.prefetch_policy,
                      storage_backend=self.storage_backend).check(True, ParallelConfig())

    @classmethod
    def from_hicache(cls, h: HiCacheConfig, host_pages: int, write_finished: bool = False) -> "TierConfig":
        return cls(host_pages, h.write_policy, h.prefetch_policy, h.prefetch_timeout_s, h.storage_backend,
                   h.storage_extra, write_finished=write_finished)


def namespace_for(model: str, k: torch.Tensor, page_size: int, head_start: int = 0, num_heads: int = 0) -> Namespace:
    """The storage namespace of a device pool `k` ([layers, slots, heads, head_dim]) of `model`."""
    layers, _, heads, dim = k.shape
    return Namespace(model, str(k.dtype).removeprefix("torch."), page_size, f"2x{layers}x{page_size}x{heads}x{dim}",
                     head_start, num_heads or heads)


@dataclass
class TierCounters:
    """Pages moved between tiers, hits per tier, and how long loads took (engine thread only)."""

    backed_up: int = 0  # device -> host copies (write-through)
    demoted: int = 0  # device -> host at eviction
    dropped: int = 0  # left the device with no lower tier to go to
    loaded: int = 0  # host -> device (hits in the host tier)
    fetched: int = 0  # storage -> host (hits in storage)
    stored: int = 0  # host -> storage
    host_evicted: int = 0
    writes_skipped: int = 0  # write-backs dropped because the storage queue was full
    loads: int = 0  # load copies finished (host -> device batches)
    load_s: float = 0.0  # ... their total time
    prefetches: int = 0  # storage prefetches finished (lookup + fetch)
    fetch_s: float = 0.0  # ... their total time
    hit_tokens: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "storage": 0})


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
    then_store: bool = False  # backup: once in host, on to storage whatever the policy (a decode's write-back)

    def last(self) -> "Copy":
        return self if self.next is None else self.next.last()


class KVTiers:
    def __init__(self, cfg: TierConfig, k: torch.Tensor, v: torch.Tensor, page_size: int,
                 ns: Namespace | None = None) -> None:
        self.cfg = cfg
        self.k, self.v = k, v
        self.ns = ns
        self.host = HostPool(cfg.host_pages, k, page_size)
        self.store: PageStore | None = None
        self._io = Worker("kv-tier-storage")
        self.storage_counters = StorageCounters()  # kept across detach / attach
        if cfg.storage_backend is not None:
            self.attach_storage(cfg.storage_backend, cfg.storage_extra)
        self.counters = TierCounters()
        self.stream = torch.cuda.Stream(k.device) if k.is_cuda else None
        self._copier = Worker("kv-tier-copy")
        self.pages_in_flight = 0  # device pages reserved by loads not yet applied
        self.slots_in_flight = 0  # host slots reserved by fetches not yet applied
        self._jobs: dict[Job, Copy] = {}

    @property
    def pending(self) -> int:
        return self._copier.pending + self._io.pending

    def attach_storage(self, backend: str, extra: str | None) -> None:
        """Connect a storage backend (start-up, or SGLang's runtime attach; nothing may be in flight)."""
        assert self.ns is not None, "a storage tier needs the pages' namespace"
        assert self.store is None and not self._io.pending
        self.store = PageStore(create_backend(backend, extra), self.ns, self.host.slot_bytes, self.cfg.storage_retry_s,
                               counters=self.storage_counters)

    @property
    def storage_medium(self) -> str:
        """KV events' name of the storage tier (pdserve/kv_events)."""
        return MEDIUM_DISK if self.store is not None and self.store.backend.name == "file" else MEDIUM_EXTERNAL

    def detach_storage(self) -> None:
        """Close the storage backend (nothing may be in flight: the manager flushes first)."""
        assert not self._io.pending
        if self.store is not None:
            self.store.close()
            self.store = None

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
            elapsed = job.finished_at - c.t0  # submit -> done on its thread (queueing included)
            if c.kind == "load":
                self.counters.load_s += elapsed
                self.counters.loads += 1
            elif c.kind in ("lookup", "fetch"):
                self.counters.fetch_s += elapsed
                self.counters.prefetches += c.kind == "fetch" or not any(c.ok)  # a lookup that found nothing ends it
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
        """Queued copies finish, the threads stop, the storage client closes (idempotent)."""
        self._copier.close()
        self._io.close()
        if self.store is not None:
            self.store.close()
            self.store = None

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
