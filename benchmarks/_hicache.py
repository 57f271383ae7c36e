"""KV-tier systems for the serving benchmarks (issue 25): which `pdserve serve` flags a system
name means, the shared store it needs (a directory, or a mooncake_master with a store holder
run exactly as `pdserve launch` runs them), and what its servers' tiers did (/get_load).

    hicache_flags(name, out)   -> (store processes to start first, flags for every server)
    tier_totals(urls)          -> summed kv_tiers figures of those servers
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from pdserve.launch.kv_store import kv_store
from pdserve.launch.procs import Child

HOST_RATIO = 16.0  # host tier: 16x the device pool (the many-user working set fits in it)


def store_of(name: str) -> str | None:
    """`..._hicache_file` -> "file", `..._hicache_mooncake` -> "mooncake", `..._hicache` -> "" (host
    tier only), anything else -> None (no tiers)."""
    if "hicache" not in name:
        return None
    return name.rsplit("_", 1)[-1] if name.endswith(("_file", "_mooncake")) else ""


def hicache_flags(name: str, out: Path, store_gb: float = 2.0, host_gb: float | None = None
                  ) -> tuple[list[Child], list[str]]:
    """The host tier is HOST_RATIO x the pool, or `host_gb` GiB (a default-sized pool of 1 GB times
    16 on two servers would not fit this machine's memory)."""
    store = store_of(name)
    if store is None:
        return [], []
    host = ["--hicache-size", str(host_gb)] if host_gb else ["--hicache-ratio", str(HOST_RATIO)]
    flags = ["--enable-hierarchical-cache", *host]
    if not store:
        return [], flags
    folder = out / f"logs-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    extra = json.dumps({"path": str(folder / "kv-store")}) if store == "file" else None
    children, store_flags = kv_store(store, extra, store_gb, folder)
    return children, flags + store_flags[1:]  # (kv_store's own --enable-hierarchical-cache dropped)


def start_stores(children: list[Child], timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    for c in children:
        c.start()
        while not c.healthy():
            if c.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{c.name} did not start (see {c.log_path})")
            time.sleep(0.2)


def stop_stores(children: list[Child]) -> None:
    for c in reversed(children):
        c.terminate()
        c.wait_or_kill(20)


def tier_totals(urls: list[str]) -> dict[str, Any]:
    """Hit tokens per tier and storage traffic summed over servers (empty without tiers)."""
    out: dict[str, Any] = {}
    for url in urls:
        with urllib.request.urlopen(url + "/get_load", timeout=10) as r:
            tiers = json.loads(r.read()).get("kv_tiers")
        if not tiers:
            continue
        for tier, n in tiers["hit_tokens"].items():
            out[f"hit_{tier}"] = out.get(f"hit_{tier}", 0) + n
        st = tiers["storage"]
        for key in ("bytes_read", "bytes_written", "pages_read", "pages_written"):
            out[f"storage_{key}"] = out.get(f"storage_{key}", 0) + st[key]
        for key in ("load_back", "prefetch"):
            out[f"{key}_n"] = out.get(f"{key}_n", 0) + tiers[key]["count"]
            out[f"{key}_s"] = out.get(f"{key}_s", 0.0) + tiers[key]["seconds"]
    return out
