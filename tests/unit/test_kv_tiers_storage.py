"""The storage tier of the KV hierarchy: page framing and checks, the file backend (atomic
writes, LRU under a size cap, a vanished directory), and the mooncake backend against a real
`mooncake_master` started here (127.0.0.1, free ports, killed by PID), including the master
dying mid-run and coming back."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pdserve.engine.kv_tiers.codec import HEADER_BYTES, BadPage, Namespace, frame_page, open_page
from pdserve.engine.kv_tiers.file_store import FileStore
from pdserve.engine.kv_tiers.mooncake_store import MooncakeStore, MooncakeStoreConfig
from pdserve.engine.kv_tiers.storage import PageStore, parse_size
from tests.mooncake_master import MooncakeMaster

NS = Namespace("tiny", "float32", 4, "2x2x4x2x16")
PAGE = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one page in that layout


def payload(i: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(PAGE))


def test_frame_round_trip_and_every_check() -> None:
    data = frame_page(NS, 0xABC, payload(1))
    assert bytes(open_page(NS, 0xABC, data, PAGE)) == payload(1)
    flipped = bytearray(data)
    flipped[HEADER_BYTES + len(NS.text()) + 100] ^= 1
    cases = {
        "checksum": bytes(flipped),
        "truncated": data[:-1],
        "namespace": data,  # read under another namespace below
        "hash": data,  # read under another page hash below
        "missing": None,
        "header": data[:10],
    }
    for what, blob in cases.items():
        ns = Namespace("tiny", "bfloat16", 4, NS.layout) if what == "namespace" else NS
        h = 0xABD if what == "hash" else 0xABC
        with pytest.raises(BadPage):
            open_page(ns, h, blob, PAGE)
    assert NS.key(5) != Namespace("tiny", "float32", 4, NS.layout, head_start=2, num_heads=4).key(5)


def test_parse_size() -> None:
    assert parse_size("4gb", "x") == 4 << 30 and parse_size("1.5m", "x") == 3 << 19 and parse_size(7, "x") == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots", "x")


def test_file_store_round_trip_and_bad_pages_are_misses(tmp_path: Path) -> None:
    store = PageStore(FileStore(tmp_path), NS, PAGE)
    hashes = [11, 12, 13, 14]
    assert store.write(hashes, [payload(i) for i in range(4)]) == [True] * 4
    assert not list((tmp_path / ".tmp").iterdir())  # temp files renamed into place
    assert store.lookup(hashes + [15]) == 4
    assert [bytes(p) for p in store.read(hashes)] == [payload(i) for i in range(4)]
    other = PageStore(FileStore(tmp_path), Namespace("other", "float32", 4, NS.layout), PAGE)
    assert other.lookup(hashes) == 0 and other.read(hashes) == []  # never someone else's pages
    path = lambda h: tmp_path / NS.key(h)[-2:] / NS.key(h)  # noqa: E731
    blob = bytearray(path(12).read_bytes())
    blob[-1] ^= 0xFF
    path(12).write_bytes(bytes(blob))
    assert len(store.read(hashes)) == 1 and store.counters.bad_pages == {"checksum": 1}
    path(12).write_bytes(frame_page(NS, 12, payload(1))[:-5])
    assert len(store.read(hashes)) == 1 and store.counters.bad_pages["truncated"] == 1
    path(12).unlink()
    assert store.lookup(hashes) == 1 and len(store.read(hashes)) == 1 and store.counters.misses >= 2
    assert store.write([12], [payload(1)]) == [True] and len(store.read(hashes)) == 4  # rewritten: whole again


def test_file_store_evicts_least_recently_used_under_its_cap(tmp_path: Path) -> None:
    obj = len(frame_page(NS, 1, payload(0)))
    fs = FileStore(tmp_path, max_bytes=obj * 10)
    store = PageStore(fs, NS, PAGE)
    assert all(store.write(list(range(1, 9)), [payload(i) for i in range(8)]))
    for h in range(1, 9):  # distinct mtimes, oldest first
        os.utime(tmp_path / NS.key(h)[-2:] / NS.key(h), (1000 + h, 1000 + h))
    assert len(store.read([1])) == 1  # 1 is now the most recently used
    assert all(store.write(list(range(9, 14)), [payload(i) for i in range(5)]))  # over the cap: evict
    present = [h for h in range(1, 14) if store.lookup([h])]
    assert fs.used_bytes <= obj * 10 and fs.evicted >= 3
    assert 1 in present and 2 not in present and 3 not in present  # LRU went first, the read one stayed
    assert all(h in present for h in range(9, 14))  # a full store evicts, never refuses


def test_file_store_directory_gone_is_misses_then_picked_up(tmp_path: Path, caplog) -> None:
    root = tmp_path / "kv"
    store = PageStore(FileStore(root), NS, PAGE, retry_s=0.2)
    assert store.write([1], [payload(1)]) == [True]
    shutil.rmtree(root)
    with caplog.at_level("WARNING"):
        assert store.read([1]) == [] and store.lookup([1]) == 0 and store.write([2], [payload(2)]) == [False]
    assert store.counters.down and store.counters.outages == 1
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # one line, not one per call
    (root / ".tmp").mkdir(parents=True)
    time.sleep(0.25)
    assert store.write([2], [payload(2)]) == [True] and not store.counters.down
    assert [bytes(p) for p in store.read([2])] == [payload(2)]


def test_mooncake_config_sources(tmp_path: Path) -> None:
    cfg = MooncakeStoreConfig.resolve({"master_server_address": "127.0.0.1:5", "global_segment_size": "1gb"}, {})
    assert cfg.global_segment_size == 1 << 30 and cfg.metadata_server == "P2PHANDSHAKE" and cfg.protocol == "tcp"
    f = tmp_path / "mc.json"
    f.write_text(json.dumps({"master_server_address": "h:6", "protocol": "rdma", "device_name": "mlx5_0"}))
    cfg = MooncakeStoreConfig.resolve({}, {"SGLANG_HICACHE_MOONCAKE_CONFIG_PATH": str(f)})
    assert (cfg.master_server_address, cfg.protocol, cfg.device_name) == ("h:6", "rdma", "mlx5_0")
    env = {"MOONCAKE_MASTER": "h:7", "MOONCAKE_TE_META_DATA_SERVER": "http://h:8080/metadata",
           "MOONCAKE_LOCAL_BUFFER_SIZE": "32mb", "LOCAL_HOSTNAME": "node1"}
    cfg = MooncakeStoreConfig.resolve({}, env)
    assert (cfg.master_server_address, cfg.metadata_server, cfg.local_buffer_size, cfg.local_hostname) == (
        "h:7", "http://h:8080/metadata", 32 << 20, "node1")
    with pytest.raises(ValueError, match="master_server_address"):
        MooncakeStoreConfig.resolve({}, {})
    with pytest.raises(ValueError, match="unknown config keys"):
        MooncakeStoreConfig.resolve({"master_server_address": "h:1", "segment": 1}, {})


@pytest.fixture
def master():
    m = MooncakeMaster.start()
    yield m
    m.stop()


def mooncake_store(m: MooncakeMaster, retry_s: float = 2.0) -> PageStore:
    backend = MooncakeStore(MooncakeStoreConfig(master_server_address=m.address, local_hostname="127.0.0.1",
                                                global_segment_size=32 << 20, local_buffer_size=16 << 20))
    return PageStore(backend, NS, PAGE, retry_s=retry_s)


def test_mooncake_round_trip_and_bad_pages(master: MooncakeMaster) -> None:
    a, b = mooncake_store(master), mooncake_store(master)  # two instances sharing the store
    try:
        hashes = [21, 22, 23]
        assert a.write(hashes, [payload(i) for i in range(3)]) == [True] * 3
        assert a.write(hashes[:1], [payload(0)]) == [True]  # content-addressed: a re-put is fine
        assert b.lookup(hashes + [24]) == 3
        assert [bytes(p) for p in b.read(hashes)] == [payload(i) for i in range(3)]
        assert b.counters.bytes_read == 3 * len(frame_page(NS, 21, payload(0)))
        corrupt = bytearray(frame_page(NS, 25, payload(5)))
        corrupt[-3] ^= 1
        a.backend.put([NS.key(25)], [bytes(corrupt)])
        a.backend.put([NS.key(26)], [frame_page(NS, 26, payload(6))[:-8]])
        assert b.read([25]) == [] and b.read([26]) == [] and b.read([27]) == []
        assert b.counters.bad_pages == {"checksum": 1, "truncated": 1} and b.counters.misses == 2  # 24 and 27
    finally:
        a.close()
        b.close()


def test_mooncake_master_killed_mid_run_costs_only_misses(master: MooncakeMaster, caplog) -> None:
    store = mooncake_store(master, retry_s=0.5)
    try:
        assert store.write([31], [payload(1)]) == [True]
        master.kill()
        with caplog.at_level("WARNING"):
            assert store.read([31]) == []  # the master is gone: a miss, not an exception
            assert store.write([32], [payload(2)]) == [False] and store.lookup([31]) == 0
        assert store.counters.down and store.counters.outages == 1
        assert sum("unreachable" in r.message for r in caplog.records) == 1
        master.restart()  # same port: the client reconnects on its own
        deadline = time.monotonic() + 30
        while store.write([33], [payload(3)]) != [True]:
            assert time.monotonic() < deadline, "the store did not pick the master up again"
            time.sleep(0.5)
        assert not store.counters.down and [bytes(p) for p in store.read([33])] == [payload(3)]
    finally:
        store.close()


def test_master_listens_on_loopback_only(master: MooncakeMaster) -> None:
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == master.rpc_port:
                listening.append(addr)
    assert listening == ["0100007F"]  # 127.0.0.1, never 0.0.0.0


def test_a_full_mooncake_store_evicts_and_never_refuses_for_long(master: MooncakeMaster) -> None:
    backend = MooncakeStore(MooncakeStoreConfig(master_server_address=master.address, local_hostname="127.0.0.1",
                                                global_segment_size=32 << 20, local_buffer_size=16 << 20))
    big = 1 << 20
    store = PageStore(backend, Namespace("big", "uint8", 1, "1"), big)
    try:
        for h in range(1, 81):  # 80 MiB through a 32 MiB store, one page at a time
            assert store.write([h], [bytes([h]) * big]) == [True], f"page {h} refused"
        assert store.counters.write_failures == 0
        assert store.lookup([80]) == 1 and bytes(store.read([80])[0]) == bytes([80]) * big  # the newest is there
        assert store.lookup([1]) == 0  # the oldest made room
    finally:
        store.close()
