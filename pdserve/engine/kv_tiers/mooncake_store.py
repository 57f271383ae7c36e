"""The `mooncake` storage backend: Mooncake Store (`mooncake.store.MooncakeDistributedStore`).

Pages live in the memory segments that the store's clients (every pdserve instance using it)
contribute; a `mooncake_master` keeps the object index, leases and eviction (it evicts at its
high watermark when the segments fill up). Metadata goes through P2P handshakes
(`"metadata_server": "P2PHANDSHAKE"`) or an HTTP metadata server URL.

Config, first found wins (SGLang's order and names):
  1. --hicache-storage-backend-extra-config JSON with "master_server_address": HOST:PORT, and
     "metadata_server", "protocol" (tcp | rdma), "device_name", "local_hostname",
     "global_segment_size", "local_buffer_size" (bytes or "4gb");
  2. the JSON file named by SGLANG_HICACHE_MOONCAKE_CONFIG_PATH (same keys);
  3. MOONCAKE_MASTER, MOONCAKE_TE_META_DATA_SERVER, MOONCAKE_PROTOCOL, MOONCAKE_DEVICE,
     MOONCAKE_LOCAL_HOSTNAME (or LOCAL_HOSTNAME), MOONCAKE_GLOBAL_SEGMENT_SIZE,
     MOONCAKE_LOCAL_BUFFER_SIZE.
Lifecycle: `setup` at start (a master that does not answer fails start-up: the flag asked for
it); then batch put / exists / get (a put of a key already there succeeds: same content). A
full store answers NO_AVAILABLE_HANDLE and the master evicts objects whose lease has expired
(its --eviction_high_watermark_ratio / --eviction_ratio / --default_kv_lease_ttl): the put is
tried again shortly. An RPC failure (the master gone) raises StorageDown, which PageStore turns
into misses until the client reaches a master again (the client reconnects on its own; objects
the old master indexed are gone with it and read as misses).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Mapping

from pdserve.engine.kv_tiers.storage import StorageDown, parse_size

RPC_FAIL = -900  # mooncake ErrorCode::RPC_FAIL: the master did not answer
NO_AVAILABLE_HANDLE = -200  # the segments are full: the master evicts (asynchronously), try again
FULL_RETRIES = (0.05, 0.2, 0.5)  # waits between attempts at a put into a full store
KEYS = ("master_server_address", "metadata_server", "protocol", "device_name", "local_hostname",
        "global_segment_size", "local_buffer_size")
ENV = {"master_server_address": "MOONCAKE_MASTER", "metadata_server": "MOONCAKE_TE_META_DATA_SERVER",
       "protocol": "MOONCAKE_PROTOCOL", "device_name": "MOONCAKE_DEVICE",
       "local_hostname": "MOONCAKE_LOCAL_HOSTNAME", "global_segment_size": "MOONCAKE_GLOBAL_SEGMENT_SIZE",
       "local_buffer_size": "MOONCAKE_LOCAL_BUFFER_SIZE"}


@dataclass(frozen=True)
class MooncakeStoreConfig:
    master_server_address: str
    metadata_server: str = "P2PHANDSHAKE"
    protocol: str = "tcp"
    device_name: str = ""
    local_hostname: str = "localhost"
    global_segment_size: int = 4 << 30  # this client's contribution to the store
    local_buffer_size: int = 16 << 20  # the client's transfer buffer

    @classmethod
    def resolve(cls, extra: Mapping[str, object], env: Mapping[str, str] = os.environ) -> "MooncakeStoreConfig":
        if extra.get("master_server_address"):
            raw: Mapping[str, object] = extra
        elif env.get("SGLANG_HICACHE_MOONCAKE_CONFIG_PATH"):
            with open(env["SGLANG_HICACHE_MOONCAKE_CONFIG_PATH"], encoding="utf-8") as f:
                raw = json.load(f)
        elif env.get("MOONCAKE_MASTER"):
            raw = {k: env[v] for k, v in ENV.items() if env.get(v)}
            if "local_hostname" not in raw and env.get("LOCAL_HOSTNAME"):
                raw = {**raw, "local_hostname": env["LOCAL_HOSTNAME"]}
        else:
            raise ValueError('mooncake storage needs {"master_server_address": "HOST:PORT"} in '
                             "--hicache-storage-backend-extra-config (or MOONCAKE_MASTER)")
        unknown = set(raw) - set(KEYS)
        if unknown:
            raise ValueError(f"mooncake storage: unknown config keys {sorted(unknown)} (known: {', '.join(KEYS)})")
        kw: dict[str, object] = {k: raw[k] for k in KEYS if k in raw}
        for k in ("global_segment_size", "local_buffer_size"):
            if k in kw:
                kw[k] = parse_size(kw[k], f"mooncake {k}")  # type: ignore[arg-type]
        cfg = cls(**kw)  # type: ignore[arg-type]
        if cfg.protocol not in ("tcp", "rdma"):
            raise ValueError(f"mooncake storage: protocol {cfg.protocol!r} is not tcp or rdma")
        return cfg


class MooncakeStore:
    name = "mooncake"

    def __init__(self, cfg: MooncakeStoreConfig) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:  # pragma: no cover - the extra is installed in CI
            raise ValueError("--hicache-storage-backend mooncake needs the mooncake extra: "
                             "pip install 'pdserve[mooncake]' (mooncake-transfer-engine-non-cuda)") from exc
        self.cfg = cfg
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(cfg.local_hostname, cfg.metadata_server, cfg.global_segment_size,
                              cfg.local_buffer_size, cfg.protocol, cfg.device_name, cfg.master_server_address)
        if rc != 0:
            raise ValueError(f"mooncake storage: setup against master {cfg.master_server_address} failed "
                             f"(code {rc}); is mooncake_master running there?")

    @classmethod
    def from_extra(cls, extra: Mapping[str, object]) -> "MooncakeStore":
        return cls(MooncakeStoreConfig.resolve(extra))

    def put(self, keys: list[str], values: list[bytes]) -> list[bool]:
        """One batch put; into a full store, again after the master's eviction made room (a few
        short waits on the storage thread), then each page alone to keep what fits."""
        for wait in (*FULL_RETRIES, None):
            code = self.store.put_batch(keys, values)
            if code == RPC_FAIL:
                raise StorageDown(f"master {self.cfg.master_server_address} did not answer a put")
            if code == 0:
                return [True] * len(keys)
            if code != NO_AVAILABLE_HANDLE or wait is None:
                break
            time.sleep(wait)
        return [self.store.put(k, v) == 0 for k, v in zip(keys, values)]

    def get(self, keys: list[str]) -> list[bytes | None]:
        there = self.exists(keys)
        n = next((i for i, t in enumerate(there) if not t), len(keys))
        got = self.store.get_batch(keys[:n]) if n else []
        return [bytes(g) if g else None for g in got] + [None] * (len(keys) - n)

    def exists(self, keys: list[str]) -> list[bool]:
        codes = self.store.batch_is_exist(keys)
        if any(c < 0 for c in codes):
            raise StorageDown(f"master {self.cfg.master_server_address} did not answer a lookup")
        return [c == 1 for c in codes]

    def close(self) -> None:
        self.store.close()
