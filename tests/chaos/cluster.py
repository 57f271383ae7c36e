"""The chaos suite's cluster: one prefill, two decodes and a PD router, all keyed, on 127.0.0.1.

    with chaos_cluster(tmp) as c:          # real `pdserve serve` processes + an EmbeddedRouter
        c.pair.prefill / c.pair.decode / c.decode2 (ServerProcess), c.router (EmbeddedRouter)
        c.calls([...bodies...], concurrency)     # through the router, with the key
        c.settled()                            # every server idle, pools back at their marks

Built on tests/integration/pd_cluster.py (PDPair, call, wait_settled). Fast knobs so faults are
seen quickly: heartbeat 1 s x 2, router health checks every 0.5 s. Each test prints its
figures (completed / failed, seconds to idle, statuses seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import ServerProcess
from tests.integration.pd_cluster import PDPair, Reply, call

KEY = "chaos-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HB = {"PDSERVE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1", "PDSERVE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
      "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "60", "PDSERVE_DISAGGREGATION_WAITING_TIMEOUT": "60"}
ENGINE_ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "400",
               "--page-size", "16", "--chunk-budget", "128", "--seed", "0", "--max-tokens-cap", "512",
               "--api-key", KEY]
HEALTH = HealthConfig(interval_s=0.5, timeout_s=2.0, failure_threshold=2, success_threshold=1)


def router_config(pair: PDPair, decodes: list[ServerProcess], **kw: Any) -> RouterConfig:
    assert pair.prefill is not None
    workers = (WorkerSpec(pair.prefill.url, "prefill", pair.bootstrap_port),
               *(WorkerSpec(d.url, "decode") for d in decodes))
    kw.setdefault("retry", RetryConfig(max_attempts=3, initial_backoff_s=0.05))
    return RouterConfig(port=0, pd=True, workers=workers, policy=PolicyConfig("round_robin"), health=HEALTH,
                        api_key=KEY, **kw)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def engine_pid(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.url}/server_info", headers=AUTH, timeout=10).json()["engine_pid"])


@dataclass
class Chaos:
    pair: PDPair
    decode2: ServerProcess
    router: EmbeddedRouter
    marks: dict[str, int]

    @property
    def servers(self) -> dict[str, ServerProcess]:
        assert self.pair.prefill is not None and self.pair.decode is not None
        return {"prefill": self.pair.prefill, "decode": self.pair.decode, "decode2": self.decode2}

    def mark(self) -> None:
        self.marks = {name: pool_mark_keyed(s.url) for name, s in self.servers.items()}

    def settled(self, timeout: float = 30.0) -> float:
        """Seconds until every server is idle with its pool back at its mark."""
        t0 = time.monotonic()
        for name, s in self.servers.items():
            wait_settled_keyed(s.url, self.marks[name], max(0.5, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def calls(self, items: list[tuple[str, dict[str, Any], bool]], concurrency: int,
              timeout: float = 120.0) -> list[Reply]:
        async def run() -> list[Reply]:
            sem = asyncio.Semaphore(concurrency)
            limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
            async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=AUTH) as client:
                async def one(path: str, body: dict[str, Any], stream: bool) -> Reply:
                    async with sem:
                        return await call(client, self.router.url, path, body, stream, timeout)

                return await asyncio.gather(*(one(*item) for item in items))

        return asyncio.run(run())

    def revive(self) -> None:
        """Every server up again (a test before may have taken decode2 down for good), routable,
        and the pools marked."""
        if self.decode2.proc.poll() is not None:
            self.decode2 = self.pair.launch_extra_decode("revived", port=self.decode2.port)
            self.decode2.wait_healthy()
        for s in self.servers.values():
            _wait_routable(self.router, s.url)
        self.mark()

    def logs(self) -> str:
        out = [self.pair.logs()]
        out.append(f"--- decode2 ({self.decode2.log_path}) ---\n{self.decode2.log_tail(40)}")
        return "\n".join(out)


def pool_mark_keyed(url: str) -> int:
    load = httpx.get(f"{url}/get_load", headers=AUTH, timeout=10).json()
    return load["free_pages"] + load["cached_pages"]


def wait_settled_keyed(url: str, mark: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    load: dict[str, Any] = {}
    while time.monotonic() < deadline:
        load = httpx.get(f"{url}/get_load", headers=AUTH, timeout=10).json()
        if (load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0 and load["num_in_flight"] == 0
                and load["used_pages"] == 0 and load["free_pages"] + load["cached_pages"] == mark):
            assert load["integrity_errors"] == 0, load
            return load
        time.sleep(0.1)
    raise AssertionError(f"{url} did not settle within {timeout:.1f} s (pool mark {mark}): {load}")


@contextlib.contextmanager
def chaos_cluster(tmp: Path, server_args: list[str] | None = None, **router_kw: Any) -> Iterator[Chaos]:
    pair = PDPair(tmp, "tcp", [*ENGINE_ARGS, *(server_args or [])], prefill_env=HB, decode_env=HB)
    decode2: ServerProcess | None = None
    router: EmbeddedRouter | None = None
    c: Chaos | None = None
    try:
        pair.launch_prefill()
        pair.launch_decode()
        decode2 = pair.launch_extra_decode("2")
        for s in (pair.prefill, pair.decode, decode2):
            assert s is not None
            s.wait_healthy()
        router = EmbeddedRouter(router_config(pair, [pair.decode, decode2], **router_kw)).start()
        c = Chaos(pair, decode2, router, {})
        _wait_ready(router)
        c.mark()
        yield c
    except BaseException:
        print(pair.logs())
        if decode2 is not None:
            print(f"--- decode2 ---\n{decode2.log_tail(60)}")
        raise
    finally:
        if router is not None:
            router.stop()
        held = c.decode2 if c is not None else None  # a test may have replaced decode2 (restarted it)
        for extra in (decode2, held if held is not decode2 else None):
            if extra is not None:
                extra.stop(timeout=15)
        pair.stop()


def _wait_routable(router: EmbeddedRouter, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = router.app.registry.get(url) if router.app is not None else None
        if worker is not None and worker.routable():
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never became routable")


def _wait_ready(router: EmbeddedRouter, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(router.url + "/readiness", timeout=5).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("router never became ready")
