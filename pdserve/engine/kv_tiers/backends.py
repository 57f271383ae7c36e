"""Storage backends by name: `--hicache-storage-backend NAME` with its extra config (JSON text).

    parse_extra            the JSON object (None: {})
    check_backend_config   a config that cannot work fails before anything connects (serve's preflight)
    create_backend         the connected backend (file: file_store.py; mooncake: mooncake_store.py)
    storage_id             which store it is, for routers (`/server_info` `hicache_storage`)
"""

from __future__ import annotations

import json
import os

from pdserve.engine.config import HICACHE_BACKENDS
from pdserve.engine.kv_tiers.file_store import FileStore
from pdserve.engine.kv_tiers.mooncake_store import MooncakeStore, MooncakeStoreConfig
from pdserve.engine.kv_tiers.storage import StorageBackend


def parse_extra(text: str | None) -> dict[str, object]:
    """--hicache-storage-backend-extra-config: a JSON object (None: {})."""
    try:
        raw = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hicache-storage-backend-extra-config is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("--hicache-storage-backend-extra-config must be a JSON object")
    return raw


def check_backend_config(name: str, text: str | None) -> None:
    """Raise ValueError (one sentence) for a backend config that cannot work, without connecting."""
    extra = parse_extra(text)
    if name == "file":
        FileStore.settings(extra)
    elif name == "mooncake":
        MooncakeStoreConfig.resolve(extra)
    else:
        raise ValueError(f"storage backend {name!r} is not one of {', '.join(HICACHE_BACKENDS)}")


def storage_id(name: str | None, text: str | None) -> str | None:
    """Which store pages go to (`/server_info` `hicache_storage`): servers advertising the same id
    can fetch each other's pages (a router counts them, router/kv_index.py). None: no storage."""
    if name is None:
        return None
    extra = parse_extra(text)
    if name == "file":
        return "file:" + os.path.abspath(FileStore.settings(extra)[0])
    return "mooncake:" + MooncakeStoreConfig.resolve(extra).master_server_address


def create_backend(name: str, text: str | None) -> StorageBackend:
    """`--hicache-storage-backend NAME` with its extra config (JSON text): connected, ready."""
    check_backend_config(name, text)
    extra = parse_extra(text)
    if name == "file":
        return FileStore(*FileStore.settings(extra))
    return MooncakeStore.from_extra(extra)
