"""A PD cluster that finds itself through a real etcd (issue 26): servers `--discovery`, routers given no workers.

One module-wide cluster, the tests in order: a prefill and a decode server register
themselves (`pdserve serve --discovery`, lease TTL 10 s); two routers follow the same etcd
prefix: `pdserve router --discovery` as a process (A) and the same router embedded (B), both
with health checks every 10 s, so any removal seen within seconds is discovery's doing.
- served through router A, greedy output equals the unified path (the decode server answering
  the same request itself); both routers list the same workers;
- a second decode (TTL 2 s, started with the others, timed by a thread polling every 50 ms) is
  in both routers' rotation within 5 s of its first healthy answer, router A sends it requests, router B (cache_aware decode) follows its KV events;
- kill -9 of that decode: both routers drop it within its lease TTL (+1 s), router B its KV
  subscription too, and every request after that succeeds without touching it;
- etcd killed and restarted empty: the servers register again, both routers watch again (a
  record put after the restart reaches them; its deletion too) without ever dropping a live
  worker, and requests still equal the unified path;
- SIGTERM of the decode: it deregisters, so both routers drop it in ~1 s, not its 10 s TTL.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.contract import WorkerRecord
from pdserve.discovery import Registration, parse_discovery_url
from pdserve.discovery.store import EtcdStore
from pdserve.flags.procs import kill_group
from pdserve.router.config import PolicyConfig, RouterConfig
from pdserve.router.server import EmbeddedRouter
from tests.etcd_server import EtcdServer
from tests.integration.conftest import ROOT, START_TIMEOUT_S, ServerProcess, free_port
from tests.integration.etcd_cluster import N, PROMPTS, discovered, outputs, records, server_args
from tests.mock_worker import wait_until


@dataclass
class Cluster:
    etcd: EtcdServer
    tmp: Path
    servers: list[ServerProcess] = field(default_factory=list)  # every server started, stopped at the end
    url_a: str = ""
    router_b: EmbeddedRouter | None = None
    join: JoinClock | None = None  # the second decode's, started with the others (saves a model load's wait)

    def server(self, role: str, tag: str, ttl: int) -> ServerProcess:
        # a decode publishes KV events on a free port, advertised in its record
        proc = ServerProcess(server_args(role, self.etcd.url, ttl, events=role == "decode"), self.tmp / f"{tag}.log")
        self.servers.append(proc)
        return proc

    @property
    def prefill(self) -> ServerProcess:
        return self.servers[0]

    @property
    def decode(self) -> ServerProcess:
        return self.servers[1]

    @property
    def b(self) -> EmbeddedRouter:
        assert self.router_b is not None
        return self.router_b


class JoinClock(threading.Thread):
    """Polls every 50 ms: the server's first healthy answer, then the moment both routers route to it."""

    def __init__(self, cluster: Cluster, server: ServerProcess) -> None:
        super().__init__(name="join-clock", daemon=True)
        self.cluster, self.server = cluster, server
        self.t_healthy = self.t_joined = 0.0
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(self.server.url):
            if self.server.proc.poll() is not None or time.monotonic() > deadline:
                self.error = f"the second decode never answered:\n{self.server.log_tail()}"
                return
            time.sleep(0.05)
        self.t_healthy = time.monotonic()
        while not (routable_b(self.cluster, self.server.url) and routable_a(self.cluster, self.server.url)):
            if time.monotonic() > self.t_healthy + 30:
                self.error = "not in both routers' rotation 30 s after healthy"
                return
            time.sleep(0.05)
        self.t_joined = time.monotonic()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def routable_b(cluster: Cluster, url: str) -> bool:
    w = cluster.b.app.registry.get(url) if cluster.b.app else None
    return w is not None and w.routable()


def routable_a(cluster: Cluster, url: str) -> bool:
    try:
        workers = discovered(cluster.url_a)["workers"]
    except httpx.HTTPError:  # router A not listening yet
        return False
    return any(w["url"] == url and w["healthy"] and w["circuit"] == "closed" for w in workers)


def in_both(cluster: Cluster, url: str) -> bool:
    """In both routers' discovered set (router A over HTTP, router B's registry itself)."""
    return url in discovered(cluster.url_a)["discovery"]["workers"] and cluster.b.app.registry.get(url) is not None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("discovery-cluster")
    with EtcdServer(tmp) as etcd, open(tmp / "router-a.log", "wb") as router_log:
        c = Cluster(etcd, tmp)
        router_a: subprocess.Popen[bytes] | None = None
        try:
            c.server("prefill", "prefill", 10)
            c.server("decode", "decode", 10)
            port = free_port()
            c.url_a = f"http://127.0.0.1:{port}"
            router_a = subprocess.Popen(
                [sys.executable, "-m", "pdserve.cli", "router", "--pd-disaggregation", "--discovery", etcd.url,
                 "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"],
                cwd=ROOT, stdout=router_log, stderr=subprocess.STDOUT, start_new_session=True)
            cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("round_robin"),
                               decode_policy=PolicyConfig("cache_aware"),  # follows the decodes' KV events
                               discovery=parse_discovery_url(etcd.url))
            c.router_b = EmbeddedRouter(cfg).start()
            c.join = JoinClock(c, c.server("decode", "decode-2", 2))
            c.join.start()
            c.prefill.wait_healthy()
            c.decode.wait_healthy()
            yield c
        except BaseException:
            print((tmp / "router-a.log").read_text(errors="replace")[-3000:])
            for s in c.servers:
                print(f"--- {s.log_path.name}\n{s.log_tail(30)}")
            raise
        finally:
            if c.router_b is not None:
                c.router_b.stop()
            if router_a is not None:
                router_a.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    router_a.wait(15)
                kill_group(router_a)
            for s in c.servers:
                s.stop(timeout=20)


@pytest.fixture(scope="module")
def unified(cluster: Cluster) -> list[Any]:
    return outputs(cluster.decode.url)  # no bootstrap fields: the decode server runs them itself


def processed(router_url: str, worker_url: str) -> int:
    """Requests router A sent the worker (its /workers entry)."""
    return sum(w["processed"] for w in discovered(router_url)["workers"] if w["url"] == worker_url)


def test_discovered_workers_serve_like_unified(cluster: Cluster, unified: list[Any]) -> None:
    for url in (cluster.url_a, cluster.b.url):
        wait_until(lambda: httpx.get(url + "/readiness", timeout=5).status_code == 200, 20, f"{url} ready")
    assert outputs(cluster.url_a) == unified and all(unified)
    seen = discovered(cluster.url_a)["discovery"]["workers"]
    assert {cluster.prefill.url, cluster.decode.url} <= set(seen)  # the second decode may be up already
    assert discovered(cluster.b.url)["discovery"]["workers"] == seen
    found = records(cluster.etcd.url)
    prefill, decode = found[cluster.prefill.url], found[cluster.decode.url]
    assert prefill.role == "prefill" and prefill.bootstrap_port and prefill.bootstrap_host == "127.0.0.1"
    assert decode.role == "decode" and decode.kv_events_endpoint and decode.transfer_backend == "tcp"
    prefill_w = [w for w in discovered(cluster.url_a)["workers"] if w["role"] == "prefill"][0]
    assert prefill_w["bootstrap_port"] == prefill.bootstrap_port


def test_new_decode_joins_within_5s_of_healthy(cluster: Cluster) -> None:
    clock, second = cluster.join, cluster.servers[2]
    assert clock is not None
    clock.join(START_TIMEOUT_S + 40)
    assert clock.error is None and clock.t_joined > 0, clock.error
    joined = clock.t_joined - clock.t_healthy
    print(f"joined both routers {joined:.2f} s after its first healthy answer")
    assert joined <= 5.0
    wait_until(lambda: second.url in cluster.b.app.kv_index.workers, 5, "router B follows its KV events")
    assert len(outputs(cluster.url_a)) == len(PROMPTS) + 1
    assert processed(cluster.url_a, second.url) > 0, "round robin sends the new decode requests"


def test_killed_decode_leaves_within_lease_ttl(cluster: Cluster, unified: list[Any]) -> None:
    second = cluster.servers[2]
    assert in_both(cluster, second.url)
    held = cluster.b.app.registry.get(second.url)  # router B's worker object, kept to count what it gets
    assert held is not None
    kill_group(second.proc)  # kill -9 the whole process group
    t_kill = time.monotonic()
    wait_until(lambda: not in_both(cluster, second.url) and cluster.b.app.registry.get(second.url) is None
               and all(w["url"] != second.url for w in discovered(cluster.url_a)["workers"]), 4,
               "the killed decode out of both routers")
    gone = time.monotonic() - t_kill
    print(f"out of both routers {gone:.2f} s after kill -9 (lease TTL 2 s)")
    assert gone <= 2 + 1.0
    wait_until(lambda: second.url not in cluster.b.app.kv_index.workers, 2, "its KV subscription dropped")
    after = held.processed
    assert outputs(cluster.url_a) == unified
    r = httpx.post(cluster.b.url + "/v1/completions", timeout=120,
                   json={"model": "default", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == unified[0]
    assert held.processed == after and held.removed, "no request went to the killed decode"


def test_etcd_restart_servers_register_again_routers_watch_again(cluster: Cluster, unified: list[Any]) -> None:
    cfg = parse_discovery_url(cluster.etcd.url)
    live = sorted([cluster.prefill.url, cluster.decode.url])
    cluster.etcd.kill()
    cluster.etcd.start(wipe=True)  # an empty store: the servers' leases and keys are gone
    wait_until(lambda: sorted(EtcdStore(cfg).list(cfg.workers_prefix)) == [cfg.key_for(u) for u in live], 10,
               "both servers registered again")
    ghost = Registration(cfg, WorkerRecord(role="decode", url=f"http://127.0.0.1:{free_port()}", model="default",
                                           lease_ttl_s=2)).start()
    try:
        wait_until(lambda: in_both(cluster, ghost.record.url), 10, "a record put after the restart in both routers")
    finally:
        ghost.stop()
    wait_until(lambda: not in_both(cluster, ghost.record.url), 5, "its deregistration too")
    for url in (cluster.url_a, cluster.b.url):
        seen = discovered(url)
        assert seen["discovery"]["workers"] == live and seen["discovery"]["connected"]
        assert seen["discovery"]["rewatches"] >= 1
        metrics = httpx.get(url + "/metrics", timeout=5).text
        removed = [x for x in metrics.splitlines()
                   if x.startswith('sglang:router_discovery_changes_total{kind="removed"}')]
        assert removed and float(removed[0].rsplit(" ", 1)[1]) == 2.0, "only the killed decode and the ghost left"
    assert outputs(cluster.url_a) == unified


def test_clean_stop_deregisters(cluster: Cluster) -> None:
    cluster.decode.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_until(lambda: not in_both(cluster, cluster.decode.url), 5, "the stopped decode out of both routers")
    assert time.monotonic() - t0 < 3, "deregistered, not left to its 10 s lease"
    assert httpx.get(cluster.url_a + "/readiness", timeout=5).status_code == 503  # no decode left
