"""The mooncake backend: the prefill WRITEs pages straight into the decode's KV pool with the
Mooncake Transfer Engine (tcp here, RDMA with --disaggregation-ib-device), one-sided like shm.

Lifecycle:
  both     the manager takes a TransferEngine from a per-process pool (initialised with
           config.mooncake_metadata, P2PHANDSHAKE by default, the effective protocol and the ib
           device) and registers its K and V once; close() unregisters them and hands the engine
           back to the pool. Engines are never destroyed: that holds the GIL for up to ~1 s each
           (also at interpreter exit), so they are reused, and with P2PHANDSHAKE (no metadata
           server to clean up) deliberately leaked, so a process exits at once. The session id
           of an engine is "host:rpc_port".
  decode   its Hello carries MooncakeRegion(session id, PoolRegion of its pool).
  prefill  on Hello: check the pool is compatible (slot bytes, whole pages). Per send task: one
           segment per (K|V, layer, run), runs contiguous on both sides merged, then
           batch_transfer_sync_write in batches of at most MAX_BATCH (the tcp transport rejects
           more than ~2048 queued transfers per peer and then refuses the peer for a moment);
           a negative return raises, which fails the room. Completion: Done on the control
           session once the writes returned (write_pages returns 0 frames).
  failures as shm: a failed room's pages are freed only after prefill's RoomFailed (sent once no
           write of the room is in hand) or once the prefill process is gone.

Stale segments: an engine caches each peer's segment (its buffers and data port) by session id
for its lifetime, and the Python API cannot drop it. A decode restarted at the same host and rpc
port would be written through a stale cache (the writes fail). So each engine remembers which
decode manager (identity.instance) every session id belonged to; a Hello whose session id was
seen with another instance is served by another engine (a fresh one if none is clean).

Engine facts (mooncake-transfer-engine 0.3.13, tcp): several engines per process work (the
in-process tests run prefill and decode managers side by side); a sync batch busy-polls one core
until it completes and gives up after MC_TRANSFER_TIMEOUT (default 30 s) + 1 ns per byte.

Logging: Mooncake logs through glog at INFO (several lines per engine and per new peer). Unless
MC_LOG_LEVEL is set, this module sets it to ERROR before the library loads (it is read then);
one "Local segment descriptor not found" ERROR line per new engine is harmless.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import torch

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # read when the engine library loads

try:
    import mooncake.engine as _mc_engine
    from mooncake.engine import TransferEngine
except ImportError as _exc:  # present but unloadable (libibverbs1, or libcuda for the CUDA wheel)
    if isinstance(_exc, ModuleNotFoundError) and _exc.name in ("mooncake", "mooncake.engine"):
        raise ModuleNotFoundError(str(_exc), name="mooncake") from _exc
    raise ModuleNotFoundError(f"mooncake is unusable: {_exc}", name="mooncake") from _exc

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import HeadSlice, Hello, KVLayout, MooncakeRegion, PoolRegion, mooncake_region_decoder
from pdserve.disagg.transfer.backends.pages import Run
from pdserve.disagg.transfer.backends.remote_pool import check_dst_runs, check_region, kv_segments, pool_region
from pdserve.disagg.transfer.sessions.manager import SessionTransferManager, raise_write_error
from pdserve.disagg.transfer.sessions.wire import FrameSocket, SessionClosed, advertised_host

MAX_BATCH = 1024  # segments per batch_transfer_sync_write call


def engine_protocol(config: DisaggConfig) -> tuple[str, str]:
    """(protocol, device names) for TransferEngine.initialize: rdma on config.ib_device when one
    is given, else config.mooncake_protocol (tcp, no device)."""
    if config.ib_device:
        return "rdma", config.ib_device
    if config.mooncake_protocol == "rdma":
        raise ValueError("mooncake protocol 'rdma' needs an RDMA device: pass --disaggregation-ib-device "
                         "(PDSERVE_DISAGGREGATION_IB_DEVICE), e.g. mlx5_0, or use protocol tcp")
    return "tcp", ""


# --- engines: one pool per process --------------------------------------------------------------


class EngineSpec(NamedTuple):
    hostname: str
    metadata: str
    protocol: str
    device: str


@dataclass(eq=False)
class PooledEngine:
    engine: Any  # mooncake.engine.TransferEngine
    spec: EngineSpec
    session_id: str
    peers: dict[str, str] = field(default_factory=dict)  # session id written to -> decode instance


_free_engines: list[PooledEngine] = []
_free_lock = threading.Lock()


def acquire_engine(spec: EngineSpec) -> PooledEngine:
    """A free engine of this spec from the process pool (last released first), else a new one."""
    with _free_lock:
        for i in range(len(_free_engines) - 1, -1, -1):  # the most recently released first
            if _free_engines[i].spec == spec:
                return _free_engines.pop(i)
    engine = TransferEngine()
    rc = engine.initialize(spec.hostname, spec.metadata, spec.protocol, spec.device)
    if rc != 0:
        raise RuntimeError(f"mooncake TransferEngine.initialize({spec.hostname!r}, {spec.metadata!r}, "
                           f"{spec.protocol!r}, {spec.device!r}) failed (rc={rc}); see its log above")
    if spec.metadata == "P2PHANDSHAKE":  # never destroyed (see the module docstring)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(engine))
    return PooledEngine(engine, spec, f"{spec.hostname}:{engine.get_rpc_port()}")


def release_engine(pooled: PooledEngine) -> None:
    with _free_lock:
        _free_engines.append(pooled)


# --- the manager --------------------------------------------------------------------------------


@dataclass(eq=False)
class DecodeRegion:
    session_id: str
    pool: PoolRegion
    num_pages: int
    engine: PooledEngine
    closed: bool = False


class MooncakeTransferManager(SessionTransferManager):
    backend_name = "mooncake"
    one_sided = True

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1", **kwargs: Any) -> None:
        if k.device.type == "cuda" and not getattr(_mc_engine, "SUPPORT_CUDA", False):
            raise ValueError(f"this mooncake build has no CUDA support and the KV pool is on {k.device}: "
                             "install mooncake-transfer-engine (the CUDA wheel)")
        if k.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the mooncake backend moves host or CUDA memory; the KV pool is on {k.device}")
        self._local = pool_region(k, v)  # (the base class checks the layout)
        ranges = {(t.data_ptr(), t.numel() * t.element_size()) for t in (k, v) if t is not None}
        self._ranges = sorted(ranges)
        protocol, device = engine_protocol(config)
        self._spec = EngineSpec(advertised_host(host), config.mooncake_metadata, protocol, device)
        self._engine_lock = threading.Lock()
        self._engines: list[PooledEngine] = []
        self._engines.append(self._new_engine())
        try:
            super().__init__(role, k, v, page_size, layout, config, host, **kwargs)
        except BaseException:
            self._release_engines()
            raise

    @property
    def session_id(self) -> str:
        """This manager's Mooncake session id (its first engine's)."""
        return self._engines[0].session_id

    def _new_engine(self) -> PooledEngine:
        pooled = acquire_engine(self._spec)
        done: list[int] = []
        for addr, nbytes in self._ranges:
            rc = pooled.engine.register_memory(addr, nbytes)
            if rc != 0:
                for a in done:
                    pooled.engine.unregister_memory(a)
                release_engine(pooled)
                raise RuntimeError(f"mooncake register_memory({addr:#x}, {nbytes}) failed (rc={rc})")
            done.append(addr)
        return pooled

    def _release_engines(self) -> None:
        with self._engine_lock:
            engines, self._engines = self._engines, []
        for pooled in engines:
            for addr, _ in self._ranges:
                pooled.engine.unregister_memory(addr)
            release_engine(pooled)

    def close(self) -> None:
        super().close()
        self._release_engines()

    # --- backend hooks ------------------------------------------------------------------------

    def hello_region(self) -> bytes:
        return msgspec.msgpack.encode(MooncakeRegion(session_id=self.session_id, pool=self._local))

    def open_region(self, hello: Hello) -> DecodeRegion:
        region = mooncake_region_decoder.decode(hello.region)
        num_pages = check_region(region.pool, self._local, self.page_size)
        sid, instance = region.session_id, hello.identity.instance
        with self._engine_lock:
            if not self._engines:
                raise RuntimeError("mooncake transfer manager closed")
            pooled = next((e for e in self._engines if e.peers.get(sid, instance) == instance), None)
            if pooled is None:  # every engine has sid cached for an earlier decode at that address
                pooled = self._new_engine()
                self._engines.append(pooled)
            pooled.peers[sid] = instance
        return DecodeRegion(sid, region.pool, num_pages, pooled)

    def close_region(self, region: Any) -> None:
        region.closed = True  # the engine keeps its cached segment (no API to drop it); see above

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int:
        dst: DecodeRegion = region
        if dst.closed:
            raise SessionClosed("decode session closed")
        check_dst_runs(runs, dst.num_pages)
        src, dst_addr, length = (a.tolist() for a in kv_segments(runs, self.k.shape[0], self.page_size,
                                                                   self._local, dst.pool, heads))
        # one batch at a time: a sync batch busy-polls a core until done, so parallel batches were
        # slower here (0.72 -> 0.50 GB/s on 2 cores), and they would share the per-peer queue cap
        for a in range(0, len(src), MAX_BATCH):
            b = a + MAX_BATCH
            rc = dst.engine.engine.batch_transfer_sync_write(dst.session_id, src[a:b], dst_addr[a:b], length[a:b])
            if rc < 0:
                raise_write_error(dst, f"mooncake write of {len(src[a:b])} segment(s), {sum(length[a:b])} B "
                                       f"to {dst.session_id} failed (rc={rc})")
        return 0
