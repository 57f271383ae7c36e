"""The shared KV store of a launch (`pdserve launch --hicache-storage-backend file|mooncake`).

Mooncake Store keeps pages in memory segments that its clients contribute and a
`mooncake_master` indexes; a client's segment, and every page in it, goes when the client
exits. So that pages outlive any one server, launch runs the store itself:

    mooncake_master       127.0.0.1, free RPC and metrics ports: the object index, leases, eviction
    store holder          Mooncake's own store service (`python -m mooncake.mooncake_store_service`),
                          the one client with a segment (--hicache-store-gb): every page lives here
    servers               clients with global_segment_size 0: they put pages into the holder's
                          segment and read anyone's, over tcp

Lifecycle: both start before the servers (a server's store client needs the master at start-up)
and are ready when the master's metrics port and the holder's REST API answer; they stop after
the servers (holder, then master) with the cluster. A full store evicts (the master's high
watermark), never fails a request. With `file` the store is a directory (given in the extra
config's "path", else `kv-store/` in the log folder), shared by the servers and left in place.
Given an extra config with its own `master_server_address`, launch starts no master or holder:
that store is someone else's.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

from pdserve.launch.procs import Child, python_module

HOLDER_BUFFER = "64mb"  # the holder's transfer buffer
SERVER_BUFFER = "64mb"  # each server's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mooncake_master_binary() -> str:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or spec.origin is None:
        raise ValueError("--hicache-storage-backend mooncake needs the mooncake extra: "
                         "pip install 'pdserve[mooncake]' (mooncake-transfer-engine-non-cuda)")
    return str(Path(spec.origin).parent / "mooncake_master")


def check_store(backend: str, extra: str | None) -> None:
    """Launch's preflight: a store launch cannot set up fails before anything starts (ValueError)."""
    try:
        given = json.loads(extra) if extra else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hicache-storage-backend-extra-config is not JSON: {exc}") from None
    if not isinstance(given, dict):
        raise ValueError("--hicache-storage-backend-extra-config must be a JSON object")
    if backend == "mooncake" and not given.get("master_server_address"):
        mooncake_master_binary()


def kv_store(backend: str, extra: str | None, store_gb: float, log_dir: Path) -> tuple[list[Child], list[str]]:
    """The children to start before the servers, and the flags every server gets."""
    check_store(backend, extra)
    given = json.loads(extra) if extra else {}
    children: list[Child] = []
    if backend == "file":
        config = {"path": str(log_dir / "kv-store"), **given}
        Path(config["path"]).mkdir(parents=True, exist_ok=True)
    elif given.get("master_server_address"):
        config = given
    else:
        rpc, metrics, rest = free_port(), free_port(), free_port()
        master = f"127.0.0.1:{rpc}"
        children.append(Child("mooncake-master", [
            mooncake_master_binary(), f"--rpc_port={rpc}", "--rpc_address=127.0.0.1", f"--metrics_port={metrics}",
            "--metrics_host=127.0.0.1", "--default_kv_lease_ttl=1000"], log_dir / "mooncake-master.log",
            f"http://127.0.0.1:{metrics}/metrics"))
        common = {"master_server_address": master, "metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
                  "local_hostname": "127.0.0.1"}
        holder = {**common, "device_name": "", "global_segment_size": int(store_gb * 2**30),
                  "local_buffer_size": HOLDER_BUFFER}
        holder_cfg = log_dir / "mooncake-holder.json"
        holder_cfg.write_text(json.dumps(holder))
        children.append(Child("kv-store-holder", python_module(
            "mooncake.mooncake_store_service", "--config", str(holder_cfg), "--port", str(rest)),
            log_dir / "kv-store-holder.log", f"http://127.0.0.1:{rest}/api/exist/pdserve-launch"))
        config = {**common, "global_segment_size": 0, "local_buffer_size": SERVER_BUFFER, **given}
    flags = ["--enable-hierarchical-cache", "--hicache-storage-backend", backend,
             "--hicache-storage-backend-extra-config", json.dumps(config)]
    return children, flags
