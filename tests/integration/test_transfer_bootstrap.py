"""Bootstrap server and client in this process (HTTP on 127.0.0.1, free ports): routes, the
cluster token, layout check at first contact, heartbeat death and re-learning a restarted
prefill at the same address."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

import msgspec
import pytest

from pdserve.disagg.bootstrap import BootstrapServer, publish_routes
from pdserve.disagg.bootstrap_client import BootstrapClient, BootstrapError, PrefillAddr, StaleEpoch, register_route
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, LayoutMismatch

LAYOUT = KVLayout(model="tiny", num_layers=2, kv_heads=2, head_dim=16, dtype="float32", page_size=4)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[BootstrapServer]:
    srv = BootstrapServer("127.0.0.1", 0, cluster_token="tok").start()
    srv.register(0, "127.0.0.1:5555", LAYOUT)
    try:
        yield srv
    finally:
        srv.close()


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with NO_PROXY.open(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_routes_health_and_token(server: BootstrapServer) -> None:
    status, health = _http("GET", server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["instance"] == server.instance
    assert _http("GET", server.url + "/route?rank=0")[0] == 401  # reads need the token too
    auth = {"Authorization": "Bearer tok"}
    status, info = _http("GET", server.url + "/route?rank=0", headers=auth)
    assert status == 200 and info["endpoint"] == "127.0.0.1:5555" and info["layout"]["page_size"] == 4
    assert _http("GET", server.url + "/route?rank=3", headers=auth)[0] == 404
    assert _http("GET", server.url + "/route?rank=x", headers=auth)[0] == 400
    body = json.dumps({"rank": 1, "endpoint": "127.0.0.1:6666",
                       "layout": json.loads(msgspec.json.encode(LAYOUT))}).encode()
    assert _http("PUT", server.url + "/route", body)[0] == 401
    assert _http("PUT", server.url + "/route", body, {"Authorization": "Bearer nope"})[0] == 401
    assert _http("PUT", server.url + "/route", b"{", {"Authorization": "Bearer tok"})[0] == 400
    with pytest.raises(BootstrapError, match="401"):
        register_route("127.0.0.1", server.port, 1, "127.0.0.1:6666", LAYOUT, token=None)
    register_route("127.0.0.1", server.port, 1, "127.0.0.1:6666", LAYOUT, token="tok")
    with pytest.raises(BootstrapError, match="409"):  # every rank must share the layout
        register_route("127.0.0.1", server.port, 2, "x:1", msgspec.structs.replace(LAYOUT, head_dim=8), token="tok")
    assert server.route(1).endpoint == "127.0.0.1:6666" and server.route(1).num_ranks == 2
    # route poisoning: a wrong key cannot re-point a registered rank (the table is unchanged)
    poison = json.dumps({"rank": 0, "endpoint": "10.9.9.9:1",
                         "layout": json.loads(msgspec.json.encode(LAYOUT))}).encode()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "tok"}):
        assert _http("PUT", server.url + "/route", poison, headers)[0] == 401
    assert server.route(0).endpoint == "127.0.0.1:5555" and server.route(0).num_ranks == 2


def test_without_a_secret_only_loopback_peers_register() -> None:
    srv = BootstrapServer("0.0.0.0", 0).start()
    try:
        register_route("127.0.0.1", srv.port, 0, "127.0.0.1:5555", LAYOUT)  # loopback: accepted
        assert srv.route(0).endpoint == "127.0.0.1:5555"
        outside = _outside_address()
        if outside is None:
            pytest.skip("this machine has no non-loopback IPv4 address to call from")
        with pytest.raises(BootstrapError, match="403"):
            register_route(outside, srv.port, 0, "10.9.9.9:1", LAYOUT)
        assert srv.route(0).endpoint == "127.0.0.1:5555"
    finally:
        srv.close()


def _outside_address() -> str | None:
    """A non-loopback address of this host (the UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_layout_checked_at_first_contact(server: BootstrapServer) -> None:
    client = BootstrapClient(msgspec.structs.replace(LAYOUT, page_size=16, dtype="bfloat16"),
                             DisaggConfig(cluster_token="tok"), heartbeat=False, fetch_timeout=2)
    try:
        with pytest.raises(LayoutMismatch, match=r"page_size \(decode=16, prefill 127.0.0.1:\d+=4\)"):
            client.get_route("127.0.0.1", server.port)
        deadline = time.monotonic() + 5
        while True:  # the non-blocking form reports the same error
            try:
                assert client.poll_route("127.0.0.1", server.port) is None
            except LayoutMismatch as exc:
                assert "dtype" in str(exc)
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        client.close()


def _poll(fetch: Callable[[], T | None], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while (got := fetch()) is None:
        assert time.monotonic() < deadline, "never fetched"
        time.sleep(0.01)
    return got


def test_routes_pick_the_rooms_dp_rank_and_every_tp_rank() -> None:
    """A prefill of dp 2 x tp 2 (2 of 4 KV heads per tp rank): dp rank 0 hosts the bootstrap server,
    dp rank 1 registers over HTTP; a room's routes are its dp rank's (room % 2), in tp rank order,
    each with the heads its pool holds."""
    half = [msgspec.structs.replace(LAYOUT, head_start=h, total_kv_heads=4) for h in (0, 2)]
    cfg = DisaggConfig(bootstrap_port=0, cluster_token="tok")
    server = publish_routes(cfg, [("dp0-tp0:1", half[0]), ("dp0-tp1:1", half[1])], 0, 2)
    assert server is not None
    client = BootstrapClient(msgspec.structs.replace(LAYOUT, kv_heads=4), cfg, heartbeat=False, fetch_timeout=5)
    try:
        other = dataclasses.replace(cfg, bootstrap_port=server.port)
        assert publish_routes(other, [("dp1-tp0:1", half[0]), ("dp1-tp1:1", half[1])], 1, 2) is None
        assert _poll(lambda: client.routes("127.0.0.1", server.port, 7)) == [("dp1-tp0:1", (0, 2)),
                                                                             ("dp1-tp1:1", (2, 2))]
        assert _poll(lambda: client.routes("127.0.0.1", server.port, 4)) == [("dp0-tp0:1", (0, 2)),
                                                                             ("dp0-tp1:1", (2, 2))]
    finally:
        client.close()
        server.close()


def test_unreachable_prefill_is_a_clear_error() -> None:
    client = BootstrapClient(LAYOUT, DisaggConfig(), heartbeat=False, fetch_timeout=0.5)
    try:
        with pytest.raises(BootstrapError, match="cannot reach prefill bootstrap server 127.0.0.1:1"):
            client.get_route("127.0.0.1", 1)
    finally:
        client.close()


def test_heartbeat_declares_death_and_relearns_a_restart(server: BootstrapServer) -> None:
    cfg = DisaggConfig(heartbeat_interval=0.2, heartbeat_max_failure=2, cluster_token="tok")
    client = BootstrapClient(LAYOUT, cfg)
    dead: list[tuple[PrefillAddr, list[str], str]] = []
    fired = threading.Event()
    client.add_dead_callback(lambda addr, eps, why: (dead.append((addr, eps, why)), fired.set()))
    port = server.port
    try:
        route = None
        while route is None:
            route = client.poll_route("127.0.0.1", port)
            time.sleep(0.01)
        assert route.endpoint == "127.0.0.1:5555" and route.generation == 0
        time.sleep(0.5)
        assert not fired.is_set()  # alive and well
        t0 = time.monotonic()
        server.close()
        assert fired.wait(cfg.heartbeat_deadline + 2.0), "heartbeat never declared the prefill dead"
        elapsed = time.monotonic() - t0
        assert elapsed < cfg.heartbeat_deadline + 1.5
        assert dead[0][0] == PrefillAddr("127.0.0.1", port) and dead[0][1] == ["127.0.0.1:5555"]
        assert "missed 2 heartbeats" in dead[0][2]
        assert client.cached("127.0.0.1", port) is None and client.generation("127.0.0.1", port) == 1

        restarted = BootstrapServer("127.0.0.1", port).start()  # same address, new instance
        try:
            restarted.register(0, "127.0.0.1:7777", LAYOUT)
            again = client.get_route("127.0.0.1", port)
            assert again.endpoint == "127.0.0.1:7777" and again.instance == restarted.instance
            assert again.generation == 1
            fired.clear()
            restarted.close()  # a quick restart between heartbeats is noticed by the instance id
            quick = BootstrapServer("127.0.0.1", port).start()
            try:
                quick.register(0, "127.0.0.1:8888", LAYOUT)
                assert fired.wait(3.0)
                assert dead[-1][1] == ["127.0.0.1:7777"]
                assert client.get_route("127.0.0.1", port).endpoint == "127.0.0.1:8888"
            finally:
                quick.close()
        finally:
            restarted.close()
    finally:
        client.close()


def test_a_lookup_naming_another_role_epoch_is_refused() -> None:
    """A prefill at role epoch 3 (two live switches on): a lookup naming epoch 1 gets 409 and the client's
    StaleEpoch, never a route; its own epoch (or none) gets the route. A cached route of epoch 3 refuses an
    older lookup at once; a newer one (the prefill switched away and back) drops it and asks again."""
    srv = BootstrapServer("127.0.0.1", 0, cluster_token="tok", epoch=3).start()
    srv.register(0, "127.0.0.1:5555", LAYOUT)
    client = BootstrapClient(LAYOUT, DisaggConfig(cluster_token="tok"), heartbeat=False, fetch_timeout=2)
    dead: list[str] = []
    client.add_dead_callback(lambda addr, eps, why: dead.append(why))
    auth = {"Authorization": "Bearer tok"}
    try:
        status, body = _http("GET", srv.url + "/route?rank=0&epoch=1", headers=auth)
        assert status == 409 and "stale epoch 1" in body["error"]
        assert _http("GET", srv.url + "/route?rank=0&epoch=3", headers=auth)[1]["epoch"] == 3
        assert _http("GET", srv.url + "/route?rank=0", headers=auth)[1]["epoch"] == 3
        with pytest.raises(StaleEpoch, match="409"):
            client.get_route("127.0.0.1", srv.port, epoch=1)
        assert client.cached("127.0.0.1", srv.port) is None  # nothing learnt from a refused lookup
        assert _poll(lambda: client.routes("127.0.0.1", srv.port, 7, epoch=3)) == [("127.0.0.1:5555", (0, 2))]
        with pytest.raises(StaleEpoch, match="at epoch 3, the request names 2"):
            client.routes("127.0.0.1", srv.port, 7, epoch=2)
        srv.epoch = 5  # switched away and back: the cached epoch-3 route goes, the lookup asks again
        assert client.get_route("127.0.0.1", srv.port, epoch=5).epoch == 5
        assert dead == ["a new role epoch (3 -> 5)"]
    finally:
        client.close()
        srv.close()
