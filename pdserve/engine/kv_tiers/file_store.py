"""The `file` storage backend: one file per page in a directory (maybe shared between hosts).

    DIR/ab/pdkv-<namespace digest>-<page hash ..ab>    objects, fanned out by the key's last 2 chars
    DIR/.tmp/<key>.<pid>.<n>                          writes in progress

Lifecycle of an object: written to `.tmp/` then renamed into place (atomic on one filesystem:
a reader sees the whole object or none); read by anyone (reading bumps its mtime: the LRU
clock, so it works on noatime mounts); evicted, least recently used first, when this process
sees the directory over `max_bytes` (it rescans the directory then, so writers on other hosts
are counted; each evicts down to 90% of the cap). A full disk evicts and retries once; the
write then fails (a miss later), never the request. Temp files older than a minute (a writer
that died) go at the next scan.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from pdserve.engine.kv_tiers.storage import StorageDown, parse_size

DEFAULT_MAX_BYTES = 64 << 30
STALE_TMP_S = 60.0


class FileStore:
    name = "file"

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"file storage: max_bytes must be > 0, got {max_bytes}")
        self.root = Path(path)
        self.max_bytes = max_bytes
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        self.evicted = 0  # objects this process removed to stay under the cap
        self._bytes = self._scan()[1]

    @staticmethod
    def settings(extra: dict[str, object]) -> tuple[str, int]:
        """(path, max_bytes) from `{"path": DIR, "max_bytes": 64gb}` (path also from
        SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR); raises ValueError for a config that cannot work."""
        unknown = set(extra) - {"path", "max_bytes"}
        if unknown:
            raise ValueError(f"file storage: unknown extra config keys {sorted(unknown)} (path, max_bytes)")
        path = extra.get("path") or os.environ.get("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR")
        if not isinstance(path, str) or not path:
            raise ValueError('file storage needs {"path": DIR} in --hicache-storage-backend-extra-config')
        size = extra.get("max_bytes", DEFAULT_MAX_BYTES)
        if not isinstance(size, (int, float, str)):
            raise ValueError(f"file storage max_bytes: {size!r} is not a size")
        max_bytes = parse_size(size, "file storage max_bytes")
        if max_bytes <= 0:
            raise ValueError(f"file storage: max_bytes must be > 0, got {max_bytes}")
        return path, max_bytes

    def _path(self, key: str) -> Path:
        return self.root / key[-2:] / key

    # -- StorageBackend -----------------------------------------------------------------------
    def put(self, keys: list[str], values: list[bytes]) -> list[bool]:
        return [self._put_one(k, v) for k, v in zip(keys, values)]

    def _put_one(self, key: str, value: bytes) -> bool:
        path = self._path(key)
        if path.exists():  # content-addressed: the same bytes are there already
            self._touch(path)
            return True
        for attempt in (0, 1):
            try:
                self._write(path, key, value)
            except OSError as exc:
                if not self.root.is_dir():
                    raise StorageDown(f"{self.root} is gone") from exc
                if attempt == 0:
                    self._evict(len(value) * 4)  # a full disk: make room, try once more
                    continue
                return False
            self._bytes += len(value)
            if self._bytes > self.max_bytes:
                self._evict(0)
            return True
        return False

    def _write(self, path: Path, key: str, value: bytes) -> None:
        tmp = self._tmp / f"{key}.{os.getpid()}.{next(self._seq)}"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, keys: list[str]) -> list[bytes | None]:
        if not self.root.is_dir():
            raise StorageDown(f"{self.root} is gone")
        out: list[bytes | None] = []
        for key in keys:
            path = self._path(key)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                out.append(None)
                continue
            self._touch(path)
            out.append(data)
        return out

    def exists(self, keys: list[str]) -> list[bool]:
        if not self.root.is_dir():
            raise StorageDown(f"{self.root} is gone")
        return [self._path(k).exists() for k in keys]

    def close(self) -> None:
        pass

    # -- LRU under the cap --------------------------------------------------------------------
    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:  # evicted by someone else meanwhile
            pass

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, path) of every object, and their total; stale temp files are removed."""
        entries: list[tuple[float, int, str]] = []
        now = time.time()
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if sub.name == ".tmp":
                    if now - st.st_mtime > STALE_TMP_S:
                        Path(e.path).unlink(missing_ok=True)
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
        return entries, sum(s for _, s, _ in entries)

    def _evict(self, extra: int) -> None:
        """Rescan; remove least recently used objects until total + extra <= 90% of the cap."""
        entries, total = self._scan()
        target = int(self.max_bytes * 0.9) - extra
        entries.sort()
        for _, size, path in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process evicted it
            total -= size
            self.evicted += 1
        self._bytes = total

    @property
    def used_bytes(self) -> int:
        return self._bytes
