"""KV tiers seen from outside the engine, without processes: the flags (a --hicache-* flag without
--enable-hierarchical-cache, what cannot work), what `pdserve launch --hicache-storage-backend`
starts and tells every server, and the router's index of tiers and shared stores (a page a
worker can fetch from its store counts for cache_aware and, whole, for conditional PD)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pdserve.engine.args import check_engine_args
from pdserve.engine.config import HICACHE_BACKENDS
from pdserve.kv_events import MEDIUM_EXTERNAL, MEDIUM_HOST, BlockRemoved, BlockStored, KVEventBatch, chain_hashes
from pdserve.launch.cluster import Cluster, preflight
from pdserve.launch.config import LAUNCH_FLAGS, STORE_BACKENDS, LaunchConfig, config_from_args
from pdserve.flags.table import add_flags
from pdserve.router.kv_index import STORE_WEIGHT, KVIndex
from pdserve.server.serve import add_serve_arguments


def serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(list(argv))


def test_flags_refuse_what_cannot_work(tmp_path: Path) -> None:
    for argv, match in [(["--hicache-ratio", "3"], "needs --enable-hierarchical-cache"),
                        (["--enable-hierarchical-cache", "--disable-radix-cache"], "radix cache"),
                        (["--enable-hierarchical-cache", "--dp-size", "2"], "not supported yet"),
                        (["--enable-hierarchical-cache", "--hicache-storage-backend", "file"], "path"),
                        (["--enable-hierarchical-cache", "--hicache-storage-backend", "mooncake"], "master"),
                        (["--enable-hierarchical-cache", "--hicache-storage-backend-extra-config", "{}"],
                         "needs --hicache-storage-backend")]:
        with pytest.raises(ValueError, match=match):
            check_engine_args(serve_args(*argv))
    ok = serve_args("--enable-hierarchical-cache", "--hicache-storage-backend", "file",
                    "--hicache-storage-backend-extra-config", json.dumps({"path": str(tmp_path)}),
                    "--hicache-write-policy", "write_back", "--hicache-size", "0.5")
    check_engine_args(ok)


def launch_config(tmp_path: Path, *argv: str) -> LaunchConfig:
    p = argparse.ArgumentParser()
    add_flags(p, LAUNCH_FLAGS, LaunchConfig())
    return config_from_args(p.parse_args(["--log-dir", str(tmp_path), "--port", "0", *argv]))


def test_launch_runs_the_mooncake_store_before_the_servers_and_tells_them(tmp_path: Path) -> None:
    assert STORE_BACKENDS == HICACHE_BACKENDS  # launch spells the engine's names (it imports no engine)
    cluster = Cluster(launch_config(tmp_path, "--hicache-storage-backend", "mooncake", "--hicache-store-gb", "0.5"),
                      tmp_path)
    assert [c.name for c in cluster.children][:2] == ["mooncake-master", "kv-store-holder"]
    holder = json.loads((tmp_path / "mooncake-holder.json").read_text())
    assert holder["global_segment_size"] == 1 << 29 and holder["master_server_address"].startswith("127.0.0.1:")
    for server in cluster.servers:
        cmd = server.cmd
        extra = json.loads(cmd[cmd.index("--hicache-storage-backend-extra-config") + 1])
        assert "--enable-hierarchical-cache" in cmd and cmd[cmd.index("--hicache-storage-backend") + 1] == "mooncake"
        assert extra["master_server_address"] == holder["master_server_address"]
        assert extra["global_segment_size"] == 0  # pages go to the holder's segment: they outlive any server
    theirs = Cluster(launch_config(tmp_path, "--hicache-storage-backend", "mooncake",
                                   "--hicache-storage-backend-extra-config",
                                   json.dumps({"master_server_address": "10.0.0.9:50051"})), tmp_path)
    assert not theirs.stores  # someone else's store: launch starts no master
    files = Cluster(launch_config(tmp_path, "--hicache-storage-backend", "file"), tmp_path)
    assert not files.stores and (tmp_path / "kv-store").is_dir()
    with pytest.raises(ValueError, match="may not set --hicache-storage-backend"):
        p = argparse.ArgumentParser()
        add_flags(p, LAUNCH_FLAGS, LaunchConfig())
        preflight(p.parse_args(["--port", "0", "--hicache-storage-backend", "file", "--server-args",
                                "--hicache-storage-backend mooncake"]))


def test_router_index_counts_pages_any_worker_of_a_store_can_fetch() -> None:
    index = KVIndex()
    a, b, c = (index.follow(u, s) for u, s in (("http://a", "mooncake:m:1"), ("http://b", "mooncake:m:1"),
                                                  ("http://c", None)))
    for w in (a, b, c):
        w.synced, w.block_size = True, 4
    toks = list(range(40))
    h = chain_hashes(toks, 4)
    events = [BlockStored(block_hashes=h[:6], parent_block_hash=None, token_ids=toks[:24], block_size=4),
              BlockStored(block_hashes=h[:8], parent_block_hash=None, token_ids=toks[:32], block_size=4,
                          medium=MEDIUM_EXTERNAL),
              BlockRemoved(block_hashes=h[4:6]),  # left a's every tier (still in the store)
              BlockStored(block_hashes=h[2:4], parent_block_hash=h[1], token_ids=toks[8:16], block_size=4,
                          medium=MEDIUM_HOST),
              BlockRemoved(block_hashes=h[2:4], medium="GPU")]  # demoted: left the device, still in host
    assert a.apply(1, KVEventBatch(ts=1.0, events=events))
    assert a.hashes == set(h[:2]) and a.host == set(h[2:4])
    hits = index.hits(["http://a", "http://b", "http://c"], toks)
    assert hits == {"http://a": int((4 + 4 * STORE_WEIGHT) * 4), "http://b": int(8 * STORE_WEIGHT * 4),
                    "http://c": 0}  # b never computed them: it can fetch them; c has no store
    assert index.hits(["http://b"], toks, store_weight=1.0) == {"http://b": 32}  # conditional PD: whole
