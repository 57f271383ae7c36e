"""The nixl backend: the prefill WRITEs pages straight into the decode's KV pool with NIXL
(UCX underneath: RDMA/NVLink on GPU clusters, tcp + cma on one host), one-sided like shm.

Lifecycle:
  both     one NIXL agent per manager, named f"pdserve-{role}-{identity.instance}" (a process that
           restarts at the same address is a new agent, so a peer never uses stale metadata);
           K and V are registered once (DRAM, or VRAM + device id for CUDA pools) and
           deregistered in close().
  decode   its Hello carries NixlRegion: agent name + get_agent_metadata() + where its pool
           lives (PoolRegion, memory type, device id).
  prefill  on Hello: add_remote_agent(metadata) (refcounted per decode agent: a reconnecting
           decode overlaps its old session), check the pool is compatible. Per send task: one
           descriptor per (K|V, layer, run), contiguous ones merged, ONE initialize_xfer("WRITE",
           notif=f"{room}:{chunk}"; chunk = the manager's xfer counter), transfer, poll until DONE
           (ERR raises; bounded by waiting_timeout; a closing manager or a lost session cancels
           it), release. write_pages returns 1, so Done.num_frames = the notifications the
           decode must have seen.
  decode   on Done: drain get_new_notifs() into per-(prefill agent, room) chunk sets and wait
           (NOTIF_WAIT_S at most) until num_frames chunks are in, else the room fails. Sets of
           rooms that are no longer live are dropped at every drain (nothing grows).
  failures as shm: a failed room's pages are freed only after prefill's RoomFailed (sent once no
           xfer of the room is in flight) or once the prefill process is gone.
Threads: the agent is STRICT-synchronised (prefill shard consumers and decode session readers
call it concurrently); NIXL's own progress thread moves the data.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import Done, HeadSlice, Hello, KVLayout, NixlRegion, PoolRegion
from pdserve.disagg.transfer.backends.pages import Run
from pdserve.disagg.transfer.backends.remote_pool import check_dst_runs, check_region, kv_segments, pool_region
from pdserve.disagg.transfer.sessions.data_path import IncomingRoom
from pdserve.disagg.transfer.sessions.manager import SessionTransferManager, raise_write_error
from pdserve.disagg.transfer.sessions.wire import FrameSocket, SessionClosed



def _import_nixl() -> Any:
    """NIXL's Python API: the `nixl` meta package when installed, else the backend wheel itself
    (`pdserve[nixl]` installs only nixl-cu12, which runs on CPU too; the meta package would also
    pull the CUDA 13 wheel). Raises ModuleNotFoundError(name="nixl") when neither is usable."""
    try:
        import nixl

        return nixl
    except ImportError as exc:  # not installed, or installed without a usable backend wheel
        reason = str(exc)
    for name in ("nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.split(".")[0]):
                raise
    raise ModuleNotFoundError(f"nixl is not usable: {reason}", name="nixl")


_nixl = _import_nixl()
nixl_agent, nixl_agent_config, nixl_thread_sync_t = _nixl.nixl_agent, _nixl.nixl_agent_config, _nixl.nixl_thread_sync_t

logger = logging.getLogger("pdserve.disagg.nixl")
if not os.environ.get("NIXL_LOG_LEVEL"):
    logging.getLogger("nixl").setLevel(logging.WARNING)  # its INFO lines go to stdout

NOTIF_WAIT_S = 5.0  # decode: how long a Done waits for the room's notifications
CANCEL_GRACE_S = 10.0  # prefill: how long an xfer that cannot be cancelled is still awaited


hello_region_decoder = msgspec.msgpack.Decoder(NixlRegion)


def agent_name(role: str, instance: str) -> str:
    return f"pdserve-{role}-{instance}"


def mem_kind(t: torch.Tensor) -> tuple[str, int]:
    """(NIXL memory type, device id) of a pool tensor."""
    return ("VRAM", t.get_device()) if t.is_cuda else ("DRAM", 0)


def parse_notif(msg: bytes) -> tuple[int, int] | None:
    """b"room:chunk" -> (room, chunk); None for anything else."""
    try:
        room, chunk = msg.split(b":")
        return int(room), int(chunk)
    except ValueError:
        return None


class NotifCollector:
    """Decode: NIXL notifications per (prefill agent, room) -> chunk ids seen. Thread-safe.
    Only rooms for which `live(room)` holds are kept; the others are dropped at every drain."""

    def __init__(self, fetch: Callable[[], dict[str, list[bytes]]], live: Callable[[int], bool]) -> None:
        self._fetch = fetch
        self._live = live
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int], set[int]] = {}

    def drain(self) -> None:
        with self._lock:
            for agent, msgs in self._fetch().items():
                for msg in msgs:
                    parsed = parse_notif(bytes(msg))
                    if parsed is None:
                        logger.warning("ignoring a foreign NIXL notification from %s: %r", agent, msg[:64])
                    elif self._live(parsed[0]):
                        self._seen.setdefault((agent, parsed[0]), set()).add(parsed[1])
            for key in [key for key in self._seen if not self._live(key[1])]:
                del self._seen[key]

    def count(self, agent: str | None, room: int) -> int:
        """Distinct chunks of `room` seen from `agent` (None: from any agent)."""
        with self._lock:
            if agent is not None:
                return len(self._seen.get((agent, room), ()))
            return sum(len(v) for (_, r), v in self._seen.items() if r == room)

    def forget(self, room: int, agent: str | None = None) -> None:
        """Drop what was seen of `room` from `agent` (None: from every agent)."""
        with self._lock:
            for key in [key for key in self._seen if key[1] == room and agent in (None, key[0])]:
                del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(eq=False)
class RemotePool:
    """Prefill: one decode session's view of the decode's registered pool."""

    agent: str
    pool: PoolRegion
    num_pages: int
    mem_type: str
    device_id: int
    inflight: int = 0
    closed: bool = False
    released: bool = False


class NixlTransferManager(SessionTransferManager):
    backend_name = "nixl"
    one_sided = True

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1", **kwargs: Any) -> None:
        self._local = pool_region(k, v)  # raises unless K and V are contiguous
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._remote_refs: dict[str, int] = {}
        self._chunks = itertools.count()
        self._agent: Any = None
        self._reg: Any = None
        self.mem_type, self.device_id = mem_kind(k)
        super().__init__(role, k, v, page_size, layout, config, host, **kwargs)
        try:  # the endpoint is unpublished until we return, so no peer can come before this
            self.agent_name = agent_name(role, self.identity.instance)
            conf = nixl_agent_config(backends=[config.nixl_backend],
                                     sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
            self._agent = nixl_agent(self.agent_name, conf)
            if config.nixl_backend not in self._agent.backends:
                raise RuntimeError(f"NIXL backend plugin {config.nixl_backend!r} is not available "
                                   f"(plugins: {', '.join(self._agent.get_plugin_list())})")
            self._reg = self._agent.register_memory([t for t in (k, v) if t is not None])
        except Exception:
            self.close()
            raise
        self._notifs = NotifCollector(self._agent.get_new_notifs, self._room_live)

    def _room_live(self, room: int) -> bool:
        return self._decode is not None and self._decode.live(room)

    # --- decode hooks -------------------------------------------------------------------------

    def hello_region(self) -> bytes:
        return msgspec.msgpack.encode(NixlRegion(
            agent_name=self.agent_name, agent_metadata=self._agent.get_agent_metadata(), pool=self._local,
            mem_type=self.mem_type, device_id=self.device_id))

    def check_done(self, receiver: IncomingRoom, done: Done) -> str | None:
        peer = receiver.peer
        sender = agent_name("prefill", peer.instance) if peer is not None else None
        deadline = time.monotonic() + min(NOTIF_WAIT_S, self.config.waiting_timeout)
        delay = 0.0005
        try:
            while True:
                self._notifs.drain()
                got = self._notifs.count(sender, done.room)
                if got >= done.num_frames:
                    return None
                if time.monotonic() > deadline or self._closing.is_set():
                    return (f"NIXL notifications missing: {got} of {done.num_frames} transfers of room "
                            f"{done.room} announced by prefill {sender or '?'}")
                time.sleep(delay)
                delay = min(0.01, delay * 2)
        finally:
            self._notifs.forget(done.room, sender)

    # --- prefill hooks ------------------------------------------------------------------------

    def open_region(self, hello: Hello) -> RemotePool:
        region = hello_region_decoder.decode(hello.region)
        pool = region.pool
        num_pages = check_region(pool, self._local, self.page_size)
        if region.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"unknown NIXL memory type {region.mem_type!r}")
        with self._lock:
            if self._closing.is_set():
                raise RuntimeError("prefill transfer manager closing")
            if self._remote_refs.get(region.agent_name, 0) == 0:
                loaded = self._agent.add_remote_agent(region.agent_metadata)
                loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
                if loaded != region.agent_name:
                    if loaded not in self._remote_refs:
                        self._agent.remove_remote_agent(loaded)
                    raise ValueError(f"NIXL metadata is for agent {loaded!r}, not {region.agent_name!r}")
            self._remote_refs[region.agent_name] = self._remote_refs.get(region.agent_name, 0) + 1
        return RemotePool(region.agent_name, pool, num_pages, region.mem_type, region.device_id)

    def close_region(self, region: Any) -> None:
        with self._lock:
            region.closed = True
            if region.inflight == 0:
                self._release_locked(region)

    def _release_locked(self, region: RemotePool) -> None:
        if region.released:
            return
        region.released = True
        left = self._remote_refs.get(region.agent, 0) - 1
        if left > 0:
            self._remote_refs[region.agent] = left
            return
        self._remote_refs.pop(region.agent, None)
        if self._agent is not None:
            try:
                self._agent.remove_remote_agent(region.agent)
            except Exception as exc:
                logger.warning("NIXL remove_remote_agent(%s) failed: %s", region.agent, exc)

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int:
        dst: RemotePool = region
        check_dst_runs(runs, dst.num_pages)
        with self._lock:
            if dst.closed or self._closing.is_set():
                raise SessionClosed("decode session closed")
            dst.inflight += 1
        try:
            self._write(dst, room, runs, heads)
        finally:
            with self._lock:
                dst.inflight -= 1
                if dst.closed and dst.inflight == 0:
                    self._release_locked(dst)
        return 1

    def xfer_descs(self, dst: RemotePool, runs: list[Run],
                   heads: HeadSlice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Local and remote NIXL descriptor rows (addr, len, dev) for K then V."""
        src, dst_addr, length = kv_segments(runs, self.k.shape[0], self.page_size, self._local, dst.pool, heads)
        local = np.stack([src, length, np.full_like(length, self.device_id)], axis=1)
        remote = np.stack([dst_addr, length, np.full_like(length, dst.device_id)], axis=1)
        return local.astype(np.uint64), remote.astype(np.uint64)

    def _write(self, dst: RemotePool, room: int, runs: list[Run], heads: HeadSlice | None) -> None:
        agent = self._agent
        local, remote = self.xfer_descs(dst, runs, heads)
        notif = f"{room}:{next(self._chunks)}".encode()
        error: str | None = None
        try:
            handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, self.mem_type),
                                           agent.get_xfer_descs(remote, dst.mem_type), dst.agent, notif)
        except Exception as exc:  # e.g. nixlRemoteDisconnectError: decode died
            handle, error = None, f"{type(exc).__name__}: {exc}"
        if handle is not None:
            error = self._run(handle, dst)
        if error is None:
            return
        raise_write_error(dst, f"NIXL transfer to {dst.agent} failed: {error}", self._closing.is_set)

    def _run(self, handle: Any, dst: RemotePool) -> str | None:
        """Post the xfer and wait for it (bounded); the error, or None once DONE."""
        agent, state, error = self._agent, "PROC", None
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self.config.waiting_timeout
            delay = 0.00005
            while state == "PROC":
                if self._closing.is_set():
                    error = "prefill transfer manager closed"
                elif dst.closed:
                    error = "decode session closed"
                elif time.monotonic() > deadline:
                    error = f"not done within {self.config.waiting_timeout:g} s"
                if error is not None:
                    break
                time.sleep(delay)
                delay = min(0.002, delay * 2)
                state = agent.check_xfer_state(handle)
        except Exception as exc:
            state, error = "ERR", f"{type(exc).__name__}: {exc}"
        finally:
            self._finish(handle, state)
        return error if error is not None or state == "DONE" else f"transfer state {state}"

    def _finish(self, handle: Any, state: str) -> None:
        """Release the handle; one still in flight is cancelled, or awaited for CANCEL_GRACE_S."""
        try:
            handle.release()
            return
        except Exception as exc:
            if state != "PROC":
                logger.warning("NIXL release_xfer_handle failed: %s", exc)
                return
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline:
            try:
                if self._agent.check_xfer_state(handle) != "PROC":
                    handle.release()
                    return
            except Exception:
                return
            time.sleep(0.01)
        logger.error("a NIXL transfer could neither be cancelled nor finished in %g s", CANCEL_GRACE_S)

    # --- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()  # in-flight xfers stop waiting; sessions then close their regions
        super().close()
        with self._lock:
            agents, self._remote_refs = list(self._remote_refs), {}
        agent, self._agent = self._agent, None
        if agent is None:
            return
        for name in agents:
            try:
                agent.remove_remote_agent(name)
            except Exception as exc:
                logger.warning("NIXL remove_remote_agent(%s) failed: %s", name, exc)
        if self._reg is not None:
            try:
                agent.deregister_memory(self._reg)
            except Exception as exc:
                logger.warning("NIXL deregister_memory failed: %s", exc)
            self._reg = None
