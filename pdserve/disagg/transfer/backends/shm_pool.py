"""KV pools in POSIX shared memory (/dev/shm files), for the shm backend.

Lifecycle:
  decode engine   pool = allocate_shared_pool(shape, dtype)   # k, v live in /dev/shm/<name>
                  KVPool built on pool.k / pool.v; the shm manager finds them by pointer
                  ... serve ...
                  pool.close()                                 # unlink (also at exit)
  prefill (shm)   map_shared_pool(region, shape, dtype)        # per decode session, from Hello
                  (mapped lazily; page tables are prefaulted in a background thread)
                  copies pages straight into the mapping; drops it when the session ends

File layout (offsets 4 KiB-aligned):
    [0, k_bytes)                      K: [num_layers, num_slots, kv_heads, head_dim]
    [v_offset, v_offset + k_bytes)    V: same shape (none in a latent pool: v_offset -1, v None)

A killed decode cannot unlink its file: `allocate_shared_pool` first sweeps files named
`pdserve-kv-<pid>-*` that we own and whose pid is gone.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import re
import threading
import uuid
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"
PREFIX = "pdserve-kv-"
ALIGN = 4096
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: prefault writable page tables, data untouched


@dataclass(eq=False)
class SharedKVPool:
    k: torch.Tensor
    v: torch.Tensor | None  # None: a one-tensor (latent) pool
    path: str
    size: int
    k_offset: int
    v_offset: int
    closed: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def close(self) -> None:
        """Unlink the file (mappings stay valid until dropped) and forget the pool."""
        if self.closed:
            return
        self.closed = True
        _POOLS.pop(self.k.data_ptr(), None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_POOLS: dict[int, SharedKVPool] = {}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _prefault(mm: mmap.mmap) -> None:
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):  # older kernel, or the mapping went away: faults happen lazily
        pass


def _map(path: str, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
        flags = mmap.MAP_SHARED | (_POPULATE if create else 0)  # mapping a peer's pool must be quick
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _tensors(mm: mmap.mmap, shape: tuple[int, ...], dtype: torch.dtype, k_offset: int,
             v_offset: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    numel = math.prod(shape)
    k = torch.frombuffer(mm, dtype=dtype, count=numel, offset=k_offset).view(shape)
    v = None if v_offset < 0 else torch.frombuffer(mm, dtype=dtype, count=numel, offset=v_offset).view(shape)
    return k, v


def allocate_shared_pool(shape: tuple[int, ...], dtype: torch.dtype, directory: str = SHM_DIR,
                         tensors: int = 2) -> SharedKVPool:
    """Zeroed K and V tensors (`tensors` 1: K alone) of `shape` in one shared-memory file (decode side of shm)."""
    sweep_stale_pools(directory)
    shape = tuple(int(s) for s in shape)
    k_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    v_offset = _aligned(k_bytes) if tensors == 2 else -1
    size = _aligned(k_bytes) * tensors
    path = os.path.join(directory, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        mm = _map(path, size, create=True)
    except OSError as exc:
        raise OSError(f"cannot allocate a {size / 2**20:.1f} MiB shared KV pool in {directory}: {exc}") from exc
    k, v = _tensors(mm, shape, dtype, 0, v_offset)
    pool = SharedKVPool(k=k, v=v, path=path, size=size, k_offset=0, v_offset=v_offset)
    _POOLS[k.data_ptr()] = pool
    return pool


def lookup_shared_pool(k: torch.Tensor, v: torch.Tensor | None) -> SharedKVPool | None:
    """The live SharedKVPool whose tensors k and v are (views of the whole pool)."""
    pool = _POOLS.get(k.data_ptr())
    if pool is None or pool.closed or pool.k.shape != k.shape or (pool.v is None) != (v is None):
        return None
    if pool.v is not None and v is not None and pool.v.data_ptr() != v.data_ptr():
        return None
    return pool


def map_shared_pool(path: str, size: int, k_offset: int, v_offset: int, shape: tuple[int, ...],
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map another process's pool (prefill side); the tensors keep the mapping alive."""
    if not _NAME.match(os.path.basename(path)) or os.path.dirname(path) == "":
        raise ValueError(f"refusing to map {path!r}: not a pdserve shared KV pool")
    k_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if k_offset + k_bytes > size or v_offset + k_bytes > size or v_offset < -1:
        raise ValueError(f"pool of shape {shape} does not fit in {size} bytes at offsets {k_offset}/{v_offset}")
    mm = _map(path, size, create=False)
    threading.Thread(target=_prefault, args=(mm,), name="pd-shm-prefault", daemon=True).start()
    return _tensors(mm, shape, dtype, k_offset, v_offset)


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def sweep_stale_pools(directory: str = SHM_DIR) -> list[str]:
    """Unlink our pool files whose creating process is gone; returns the removed paths."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid == os.getuid() and _pid_gone(int(m.group(1))):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


@atexit.register
def _unlink_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
