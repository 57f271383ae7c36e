"""Issue 25: the KV tiers' store read / write GB/s next to this machine's copy bandwidth and the
Mooncake transfer engine's own rate, in one run.

    python benchmarks/kv_store_bandwidth.py [--pages 128] [--reps 3] [--quick] [--json]

Pages are the bundled model's (30 layers x 2 x 16 tokens x 3 KV heads x 64 x fp32 = 737 KiB),
written and read in the engine's own way: `PageStore` (framing, an xxh3 checksum per page, the
content key) over each backend, in batches of 32 pages, on one thread (the tiers' storage thread):

  file       a directory on this machine's disk (page cache: what a local or shared filesystem
             gives after its first read)
  mooncake   a real mooncake_master and a store holder (Mooncake's store service with the
             segment, started as `pdserve launch` starts them); this process is a client with
             no segment of its own, as a server is, so every page crosses Mooncake's transfer
             engine (tcp over loopback) to the holder and back
  host tier  device pool -> host slots -> device pool (`HostPool` copies), the tier above storage
Yardsticks: memcpy (a large tensor copy: machine_limits.memory_bandwidth, bytes read + written)
and the Mooncake transfer engine moving one 64 MiB PD room between two processes
(kv_transfer.py's `mooncake` backend, the engine behind the store's client). GB/s = payload
bytes / seconds (1 GB = 1e9 B); best of --reps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._hicache import start_stores, stop_stores  # noqa: E402
from benchmarks.machine_limits import memory_bandwidth  # noqa: E402
from pdserve.engine.kv_tiers.backends import create_backend  # noqa: E402
from pdserve.engine.kv_tiers.codec import Namespace  # noqa: E402
from pdserve.engine.kv_tiers.host_pool import HostPool  # noqa: E402
from pdserve.engine.kv_tiers.storage import PageStore  # noqa: E402
from pdserve.launch.kv_store import kv_store  # noqa: E402

LAYERS, HEADS, DIM, PS = 30, 3, 64, 16  # the bundled SmolLM2-135M, page size 16, fp32


def store_rates(store: PageStore, payloads: list[bytes], reps: int) -> dict[str, float]:
    """Best write and read GB/s of every page, a fresh set of keys per rep (no 'already there')."""
    nbytes = sum(len(p) for p in payloads)
    best = {"write_gb_s": 0.0, "read_gb_s": 0.0}
    for rep in range(reps):
        hashes = [(rep << 32) + i + 1 for i in range(len(payloads))]
        t0 = time.perf_counter()
        ok = store.write(hashes, payloads)
        t1 = time.perf_counter()
        got = store.read(hashes)
        t2 = time.perf_counter()
        if not all(ok) or len(got) != len(payloads):
            raise RuntimeError(f"{store.backend.name}: {sum(ok)} of {len(ok)} written, {len(got)} read back")
        best["write_gb_s"] = max(best["write_gb_s"], nbytes / (t1 - t0) / 1e9)
        best["read_gb_s"] = max(best["read_gb_s"], nbytes / (t2 - t1) / 1e9)
    return best


def host_tier_rates(pages: int, reps: int) -> dict[str, float]:
    k = torch.randn(LAYERS, (pages + 1) * PS, HEADS, DIM)
    v = torch.randn_like(k)
    host = HostPool(pages, k, PS)
    ids, slots = list(range(1, pages + 1)), list(range(pages))
    nbytes = pages * host.slot_bytes
    best = {"write_gb_s": 0.0, "read_gb_s": 0.0}
    for _ in range(reps):
        t0 = time.perf_counter()
        host.copy_to_host(k, v, ids, slots)
        t1 = time.perf_counter()
        host.copy_to_device(k, v, slots, ids)
        t2 = time.perf_counter()
        best["write_gb_s"] = max(best["write_gb_s"], nbytes / (t1 - t0) / 1e9)
        best["read_gb_s"] = max(best["read_gb_s"], nbytes / (t2 - t1) / 1e9)
    return best


def mooncake_engine_rate(reps: int) -> float | None:
    """The transfer engine's own GB/s for one 64 MiB room between two processes (kv_transfer.py)."""
    from benchmarks.kv_transfer import measure, parse_args

    r = measure(parse_args(["--backends", "mooncake", "--mib", "64", "--reps", str(reps)]))
    secs = r["seconds"].get("mooncake") or []
    return r["bytes"] / min(secs) / 1e9 if secs else None


def run(a: argparse.Namespace) -> dict[str, Any]:
    ns = Namespace("bench", "float32", PS, f"2x{LAYERS}x{PS}x{HEADS}x{DIM}", 0, HEADS)
    page = 2 * LAYERS * PS * HEADS * DIM * 4
    payloads = [os.urandom(page) for _ in range(a.pages)]
    out: dict[str, Any] = {"pages": a.pages, "page_bytes": page, "memcpy_gb_s": memory_bandwidth()}
    out["host_tier"] = host_tier_rates(a.pages, a.reps)
    with tempfile.TemporaryDirectory() as tmp:
        store = PageStore(create_backend("file", json.dumps({"path": tmp})), ns, page)
        out["file"] = store_rates(store, payloads, a.reps)
        store.close()
        children, flags = kv_store("mooncake", None, max(0.25, 3 * a.pages * page / 2**30), Path(tmp))
        start_stores(children)
        try:
            extra = flags[flags.index("--hicache-storage-backend-extra-config") + 1]
            store = PageStore(create_backend("mooncake", extra), ns, page)
            out["mooncake"] = store_rates(store, payloads, a.reps)
            store.close()
        finally:
            stop_stores(children)
    out["mooncake_transfer_engine_gb_s"] = mooncake_engine_rate(a.reps)
    return out


def report(r: dict[str, Any]) -> str:
    mc, te = r["memcpy_gb_s"], r["mooncake_transfer_engine_gb_s"]
    engine = f"{te:.2f} GB/s" if te else "not measured"
    lines = [f"{r['pages']} pages of {r['page_bytes'] / 1024:.0f} KiB; memcpy {mc:.2f} GB/s, Mooncake transfer "
             f"engine (one 64 MiB room, two processes) {engine}", "",
             "| tier | write GB/s | read GB/s | read / memcpy | read / transfer engine |", "|---|---|---|---|---|"]
    for name in ("host_tier", "file", "mooncake"):
        x = r[name]
        vs_te = f"{x['read_gb_s'] / te:.2f}" if te else "-"
        lines.append(f"| {name} | {x['write_gb_s']:.2f} | {x['read_gb_s']:.2f} | {x['read_gb_s'] / mc:.2f} | {vs_te} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 pages, 1 rep")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.pages, a.reps = 16, 1
    r = run(a)
    print(json.dumps(r) if a.json else report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
