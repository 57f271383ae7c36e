"""Discovery without etcd: the URL, the record, the watcher's known set (pending removals after a
reconnect), and the router applying changes to its registry (static workers win, modes filter).
The same parts against a real etcd: tests/integration/test_discovery_store.py and test_discovery_cluster.py."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.contract import WorkerRecord, decode_record, encode_record
from pdserve.discovery import ADDED, REMOVED, UPDATED, Change, DiscoveryConfig, Watcher, parse_discovery_url
from pdserve.discovery import watcher as watcher_mod
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.discovery import DiscoveredWorkers
from pdserve.router.metrics import RouterMetrics
from pdserve.router.workers import WorkerRegistry, new_worker


@pytest.mark.parametrize("text, host, port, prefix", [
    ("etcd://10.0.0.5:2379/team-a", "10.0.0.5", 2379, "/team-a"),
    ("etcd://etcd.local", "etcd.local", 2379, "/pdserve"),
    ("etcd://127.0.0.1:23790/", "127.0.0.1", 23790, "/pdserve"),
    ("etcd://[::1]:2379/a/b/", "::1", 2379, "/a/b"),
])
def test_discovery_urls(text: str, host: str, port: int, prefix: str) -> None:
    cfg = parse_discovery_url(text, ttl_s=3)
    assert (cfg.host, cfg.port, cfg.prefix, cfg.ttl_s) == (host, port, prefix, 3)
    assert cfg.key_for("http://h:1") == f"{prefix}/workers/h:1"
    assert parse_discovery_url(cfg.url, 3) == cfg


@pytest.mark.parametrize("text", ["http://h:2379", "etcd://", "etcd://h:notaport", "etcd://h:2379/p?x=1"])
def test_bad_discovery_urls(text: str) -> None:
    with pytest.raises(ValueError):
        parse_discovery_url(text)


def test_short_ttl_refused() -> None:
    with pytest.raises(ValueError, match="TTL"):
        parse_discovery_url("etcd://h", ttl_s=1)
    assert parse_discovery_url("etcd://h", ttl_s=6).keepalive_s == 1.0  # at most a check interval
    assert parse_discovery_url("etcd://h", ttl_s=2).keepalive_s == pytest.approx(2 / 3)


def rec(port: int, role: str = "decode", **kw: object) -> WorkerRecord:
    return msgspec.convert({"role": role, "url": f"http://127.0.0.1:{port}", "model": "m", "lease_ttl_s": 2, **kw},
                           WorkerRecord)


def test_record_round_trip_and_checks() -> None:
    r = rec(1, "prefill", bootstrap_host="10.0.0.1", bootstrap_port=8998, tp_size=2, epoch=3)
    assert decode_record(encode_record(r)) == r
    assert decode_record(b'{"role":"decode","url":"http://h:1","model":"m","future_field":1}').url == "http://h:1"
    for bad in (dict(role="both"), dict(url="h:1"), dict(role="decode", bootstrap_port=1), dict(epoch=0)):
        kw = {"role": "prefill", "url": "http://h:1", "model": "m", **bad}
        with pytest.raises(ValueError):
            decode_record(msgspec.json.encode(kw))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_watcher_keeps_missing_workers_for_their_ttl_after_a_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(watcher_mod, "time", clock)
    seen: list[tuple[str, str]] = []
    w = Watcher(DiscoveryConfig(check_interval_s=1.0), lambda c: seen.append((c.kind, c.record.url)))
    a, b = "/pdserve/workers/127.0.0.1:1", "/pdserve/workers/127.0.0.1:2"
    w._reconcile({a: encode_record(rec(1)), b: encode_record(rec(2))})
    assert seen == [(ADDED, "http://127.0.0.1:1"), (ADDED, "http://127.0.0.1:2")]
    w._reconcile({a: encode_record(rec(1, epoch=2))})  # etcd came back without b (restarted empty)
    assert seen[2:] == [(UPDATED, "http://127.0.0.1:1")] and b in w.known  # b pending: lease TTL + a check
    clock.now += 2.9
    w._expire()
    assert b in w.known
    w._put(b, encode_record(rec(2)))  # b registered again in time: no change at all
    clock.now += 10
    w._expire()
    assert len(seen) == 3 and set(w.known) == {a, b}
    w._reconcile({a: encode_record(rec(1, epoch=2))})
    clock.now += 3.01
    w._expire()
    assert seen[3:] == [(REMOVED, "http://127.0.0.1:2")]
    w._put(a, b"garbage")  # not a record: dropped like a deletion
    w._delete(a)
    assert seen[4:] == [(REMOVED, "http://127.0.0.1:1")] and w.known == {}


def test_router_applies_changes_like_the_admin_api() -> None:
    cfg = RouterConfig(pd=True, workers=(WorkerSpec("http://127.0.0.1:9", "decode"),))
    reg = WorkerRegistry()
    for spec in cfg.workers:
        reg.add(new_worker(spec, cfg))
    found = DiscoveredWorkers(cfg, DiscoveryConfig(), reg, RouterMetrics())
    key = "/pdserve/workers/127.0.0.1:1"
    prefill = rec(1, "prefill", bootstrap_host="10.1.1.1", bootstrap_port=7000)
    found.apply(Change(ADDED, key, prefill))
    w = reg.get("http://127.0.0.1:1")
    assert w is not None and w.role == "prefill" and (w.bootstrap_host, w.bootstrap_port) == ("10.1.1.1", 7000)
    assert not w.healthy  # health checks decide when it takes traffic
    found.apply(Change(UPDATED, key, rec(1, "prefill", bootstrap_host="10.1.1.1", bootstrap_port=7000, epoch=2)))
    assert reg.get("http://127.0.0.1:1") is w  # same shape, new epoch: the same worker
    found.apply(Change(UPDATED, key, rec(1, "decode", epoch=3)))  # switched role: replaced
    assert w.removed and reg.get("http://127.0.0.1:1").role == "decode"  # type: ignore[union-attr]
    found.apply(Change(ADDED, "/pdserve/workers/127.0.0.1:2", rec(2, "regular")))  # a unified server: not PD
    found.apply(Change(ADDED, "/pdserve/workers/127.0.0.1:9", rec(9, "decode")))  # given on the command line
    assert sorted(x.url for x in reg.all()) == ["http://127.0.0.1:1", "http://127.0.0.1:9"]
    found.apply(Change(REMOVED, "/pdserve/workers/127.0.0.1:9", rec(9, "decode")))  # not ours to remove
    found.apply(Change(REMOVED, key, rec(1, "decode", epoch=3)))
    assert [x.url for x in reg.all()] == ["http://127.0.0.1:9"] and reg.by_role("prefill") == []
    assert found.describe()["workers"] == []
    text = RouterMetrics().render([], 0, 0, True).decode()
    assert "sgl_router_discovery_connected 1.0" in text
