"""Discovery against a real etcd, without model servers: registration, watch, lease expiry, etcd restarts.

- a registered record reaches two watchers (they converge), an update replaces it, a clean
  stop deregisters at once (long before the lease could expire), a value that is not a
  record is ignored;
- a process killed with -9 while registered: its key goes when its lease expires (TTL 2 s),
  and the watchers hear the removal within TTL + a second;
- etcd killed and restarted on its data: the watchers watch again (a record registered after
  the restart reaches both); restarted empty: the registration notices its lost lease and
  registers again, and the watchers keep the worker throughout (no removal, its record back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from pdserve.contract import WorkerRecord
from pdserve.discovery import Change, DiscoveryConfig, Registration, Watcher, parse_discovery_url
from pdserve.discovery.store import EtcdStore
from tests.etcd_server import EtcdServer
from tests.integration.conftest import ROOT
from tests.mock_worker import wait_until


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


class Seen:
    """A watcher and the changes it reported, in order."""

    def __init__(self, cfg: DiscoveryConfig) -> None:
        self.changes: list[tuple[float, Change]] = []
        self._lock = threading.Lock()
        self.watcher = Watcher(cfg, self._on).start()

    def _on(self, change: Change) -> None:
        with self._lock:
            self.changes.append((time.monotonic(), change))

    def kinds(self, key: str) -> list[str]:
        with self._lock:
            return [c.kind for _, c in self.changes if c.key == key]

    def urls(self) -> set[str]:
        return {r.url for r in self.watcher.records().values()}


def record(port: int, role: str = "decode", **kw: object) -> WorkerRecord:
    return msgspec.convert({"role": role, "url": f"http://127.0.0.1:{port}", "model": "m", "lease_ttl_s": 2, **kw},
                           WorkerRecord)


def cfg_of(etcd: EtcdServer, ttl: int = 2) -> DiscoveryConfig:
    return parse_discovery_url(etcd.url, ttl_s=ttl)


def test_register_update_deregister_two_watchers(etcd: EtcdServer) -> None:
    cfg = cfg_of(etcd, ttl=30)  # a removal within seconds is the deregistration, not an expiry
    a, b = Seen(cfg), Seen(cfg)
    try:
        reg = Registration(cfg, record(40001, "prefill", bootstrap_port=40002)).start()
        assert reg.registered.wait(5)
        key = cfg.key_for("http://127.0.0.1:40001")
        wait_until(lambda: a.kinds(key) == ["added"] and b.kinds(key) == ["added"], 5, "both watchers add it")
        assert a.watcher.records()[key].bootstrap_port == 40002
        EtcdStore(cfg).put(cfg.workers_prefix + "junk:1", b"not a record")
        reg.update(record(40001, "prefill", bootstrap_port=40002, epoch=2))
        wait_until(lambda: a.kinds(key) == ["added", "updated"] and b.kinds(key) == ["added", "updated"], 5,
                   "the update")
        assert a.watcher.records()[key].epoch == 2 and len(a.watcher.records()) == 1  # junk ignored
        t0 = time.monotonic()
        reg.stop()
        wait_until(lambda: a.kinds(key)[-1:] == ["removed"] and b.kinds(key)[-1:] == ["removed"], 5, "removal")
        assert time.monotonic() - t0 < 3, "a clean stop deregisters at once"
        assert not EtcdStore(cfg).list(key)
        assert a.watcher.records() == b.watcher.records() == {}
    finally:
        a.watcher.stop()
        b.watcher.stop()
        EtcdStore(cfg).delete(cfg.workers_prefix + "junk:1")


REGISTER_AND_SLEEP = """
import sys, time
from pdserve.contract import WorkerRecord
from pdserve.discovery import Registration, parse_discovery_url
reg = Registration(parse_discovery_url(sys.argv[1], ttl_s=2),
                   WorkerRecord(role="decode", url="http://127.0.0.1:40011", model="m", lease_ttl_s=2)).start()
assert reg.registered.wait(10)
print("registered", flush=True)
time.sleep(600)
"""


def test_killed_process_leaves_within_its_lease_ttl(etcd: EtcdServer) -> None:
    cfg = cfg_of(etcd)
    seen = Seen(cfg)
    proc = subprocess.Popen([sys.executable, "-c", REGISTER_AND_SLEEP, etcd.url], cwd=ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ), start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"registered"
        key = cfg.key_for("http://127.0.0.1:40011")
        wait_until(lambda: seen.kinds(key) == ["added"], 5, "the worker is seen")
        time.sleep(2.5)  # a lease refreshed for longer than its TTL still holds
        assert seen.kinds(key) == ["added"]
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_until(lambda: seen.kinds(key) == ["added", "removed"], 6, "removal after the kill")
        gone = [t for t, c in seen.changes if c.kind == "removed"][0] - t_kill
        assert gone <= cfg.ttl_s + 1.0, f"removed {gone:.2f} s after kill -9 (TTL {cfg.ttl_s} s)"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        seen.watcher.stop()


def test_etcd_restarts_watchers_rewatch_servers_register_again(etcd: EtcdServer, tmp_path: Path) -> None:
    cfg = cfg_of(etcd)
    a, b = Seen(cfg), Seen(cfg)
    first = Registration(cfg, record(40021)).start()
    later: Registration | None = None
    try:
        assert first.registered.wait(5)
        k1 = cfg.key_for("http://127.0.0.1:40021")
        wait_until(lambda: a.kinds(k1) == b.kinds(k1) == ["added"], 5, "first worker seen")
        etcd.kill()
        time.sleep(1.5)
        assert a.urls() == b.urls() == {"http://127.0.0.1:40021"}, "workers stay while etcd is away"
        etcd.start()  # same data: the lease survives (etcd renews leases on restart)
        later = Registration(cfg, record(40022)).start()
        assert later.registered.wait(10)
        k2 = cfg.key_for("http://127.0.0.1:40022")
        wait_until(lambda: a.kinds(k2) == b.kinds(k2) == ["added"], 10, "a record after the restart")
        assert a.watcher.rewatches >= 1 and b.watcher.rewatches >= 1
        assert first.registrations == 1, "the lease survived a restart on the same data"

        etcd.kill()
        etcd.start(wipe=True)  # an empty store: every lease and key gone
        wait_until(lambda: first.registrations == 2 and later is not None and later.registrations == 2, 10,
                   "both servers register again")
        assert sorted(EtcdStore(cfg).list(cfg.workers_prefix)) == [k1, k2]
        time.sleep(cfg.ttl_s + 2 * cfg.check_interval_s)  # past the pending-removal window
        for seen in (a, b):
            assert seen.kinds(k1) == ["added"] and seen.kinds(k2) == ["added"], "never dropped, never re-added"
            assert seen.urls() == {"http://127.0.0.1:40021", "http://127.0.0.1:40022"}
            assert seen.watcher.connected and seen.watcher.rewatches >= 2
    finally:
        for reg in (first, later):
            if reg is not None:
                reg.stop()
        a.watcher.stop()
        b.watcher.stop()
