"""Drain, live role switch and the planner on a real cluster (issue 26, phase 2).

One module-wide cluster: a real etcd, a prefill P and two decodes D1, D2 (D2 with a bootstrap
port for a later switch to prefill), all `--discovery`, and a router given no workers that follows
etcd (embedded, round robin). `Load` threads send greedy completions through the router the whole
time a drain or switch runs (whole answers and streams); every answer must be 200 and its text
equal to the unified path's for its prompt (D1 answering the prompt itself, taken first), so a
wrong KV page anywhere would show. The tests, in order:
- drain D1 under load: 0 failed, D1's pool back at its mark (no page used), its record gone
  from etcd and the router, no request after; a switch to its own role re-opens it (epoch 2);
- switch D2 decode -> prefill under load and back: 0 failed, output equal to unified before,
  between and after, /server_info and etcd say the role and epoch, a request or a route
  lookup naming the old epoch gets 409 (a decode paired through it recomputes: same text),
  every pool back and no integrity error;
- the planner (in this process, local connector, a hand-made profile) holds 1P 2D while the
  load is decode-heavy and switches a decode to prefill once it turns prefill-heavy.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.contract import BOOTSTRAP_EPOCH, EPOCH, STALE_EPOCH
from pdserve.discovery import parse_discovery_url
from pdserve.planner import DecodePoint, Planner, PlannerConfig, PrefillPoint, Profile
from pdserve.planner.connector import LocalConnector
from pdserve.planner.live import LiveConfig, LivePlanner, PlannerMetrics
from pdserve.router.config import PolicyConfig, RouterConfig
from pdserve.router.server import EmbeddedRouter
from tests.etcd_server import EtcdServer
from tests.integration.conftest import ServerProcess
from tests.integration.etcd_cluster import PROMPTS, discovered, outputs, records, server_args
from tests.mock_worker import wait_until

SHORT = [*PROMPTS, "Once upon a time", "List three colors:"]
LONG = ["Summarise this report. " + "The quarterly numbers rose again in every region we track. " * 40,
        "Translate to French: " + "the weather is mild and the trains run on time today. " * 40]
SWITCH_S = 60.0  # a switch's bound here (the benchmark holds the 5 s target on a quiet machine)


@dataclass
class Cluster:
    etcd: EtcdServer
    p: ServerProcess
    d1: ServerProcess
    d2: ServerProcess
    router: EmbeddedRouter
    unified: dict[tuple[str, int], str] = field(default_factory=dict)  # (prompt, max_tokens) -> D1's own text

    @property
    def url(self) -> str:
        return self.router.url

    def worker(self, url: str) -> Any:
        assert self.router.app is not None
        return self.router.app.registry.get(url)

    def routable(self, url: str, role: str) -> bool:
        w = self.worker(url)
        return w is not None and w.role == role and w.routable()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("elastic-cluster")
    with EtcdServer(tmp) as etcd:
        servers = [ServerProcess(server_args(role, etcd.url, 10, bootstrap=True), tmp / f"{tag}.log")
                   for role, tag in (("prefill", "p"), ("decode", "d1"), ("decode", "d2"))]
        router: EmbeddedRouter | None = None
        try:
            cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("round_robin"),
                               discovery=parse_discovery_url(etcd.url))
            router = EmbeddedRouter(cfg).start()
            for s in servers:
                s.wait_healthy()
            c = Cluster(etcd, *servers, router)
            wait_until(lambda: httpx.get(c.url + "/readiness", timeout=5).status_code == 200, 30, "router ready")
            with httpx.Client(timeout=300) as client:
                for prompt, n in [*((p, 8) for p in SHORT), *((p, 2) for p in LONG), ("Once upon a time", 32)]:
                    c.unified[(prompt, n)] = _text(client, c.d1.url, prompt, n, stream=False)
            yield c
        except BaseException:
            for s in servers:
                print(f"--- {s.log_path.name}\n{s.log_tail(40)}")
            raise
        finally:
            if router is not None:
                router.stop()
            for s in servers:
                s.stop(timeout=20)


def _text(client: httpx.Client, base: str, prompt: str, n: int, stream: bool, **extra: Any) -> str:
    body = {"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream, **extra}
    if not stream:
        r = client.post(base + "/v1/completions", json=body)
        if r.status_code != 200:
            raise AssertionError(f"{r.status_code}: {r.text}")
        return r.json()["choices"][0]["text"]
    text = []
    with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise AssertionError(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise AssertionError(f"error frame: {event}")
                text.append(event["choices"][0]["text"])
    return "".join(text)


class Load:
    """`threads` loops of greedy completions through the router until stopped (odd threads stream)."""

    def __init__(self, url: str, prompts: list[tuple[str, int]], threads: int = 3) -> None:
        self.url, self.prompts = url, prompts
        self.results: list[tuple[str, int, str | None, str | None]] = []  # prompt, max_tokens, text, error
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        order = itertools.cycle(random.Random(i).sample(self.prompts, len(self.prompts)))
        with httpx.Client(timeout=300) as client:
            while not self._stop.is_set():
                prompt, n = next(order)
                try:
                    self.results.append((prompt, n, _text(client, self.url, prompt, n, stream=i % 2 == 1), None))
                except (AssertionError, httpx.HTTPError, ValueError) as exc:
                    self.results.append((prompt, n, None, str(exc)))

    def wait_for(self, more: int, timeout: float = 240.0) -> None:
        target = len(self.results) + more
        wait_until(lambda: len(self.results) >= target, timeout, f"{more} more answers under load")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(300)

    def check(self, unified: dict[tuple[str, int], str]) -> None:
        failed = [r for r in self.results if r[3] is not None]
        assert not failed, f"{len(failed)} of {len(self.results)} requests failed: {failed[:3]}"
        wrong = [r for r in self.results if r[2] != unified[(r[0], r[1])]]
        assert not wrong, f"{len(wrong)} answers differ from the unified path: {wrong[:2]}"


def _load(url: str) -> dict[str, Any]:
    return httpx.get(url + "/get_load", timeout=10).json()


def _settled(url: str) -> bool:
    x = _load(url)
    return x["num_in_flight"] == 0 and x["num_running_reqs"] == 0 and x["used_pages"] == 0


def test_drain_under_load(cluster: Cluster) -> None:
    d1 = cluster.d1
    held = cluster.worker(d1.url)
    with Load(cluster.url, [(p, 8) for p in SHORT]) as load:
        load.wait_for(4)
        r = httpx.post(d1.url + "/drain", json={"timeout_s": 240}, timeout=300)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["status"] == "drained" and report["in_flight"] == 0 and report["used_pages"] == 0
        assert d1.url not in records(cluster.etcd.url)
        wait_until(lambda: cluster.worker(d1.url) is None and held.in_flight == 0, 5,
                   "the drained decode out of the router")
        after = held.processed
        load.wait_for(4)
    load.check(cluster.unified)
    print(f"drain: {report['seconds']:.2f} s (deregistered in {report['deregister_s']:.3f} s), "
          f"{len(load.results)} requests, 0 failed")
    assert held.processed == after, "no request went to the drained decode"
    assert _settled(d1.url) and _load(d1.url)["integrity_errors"] == 0
    assert httpx.get(d1.url + "/health", timeout=5).status_code == 503
    state = httpx.get(d1.url + "/drain", timeout=5).json()
    assert state["phase"] == "drained" and state["last"]["status"] == "drained"
    # a switch to its own role opens it again, at the next epoch
    r = httpx.post(d1.url + "/switch_role", json={"role": "decode"}, timeout=300)
    assert r.status_code == 200 and r.json()["epoch"] == 2, r.text
    wait_until(lambda: cluster.routable(d1.url, "decode"), 10, "D1 back in the rotation")
    assert records(cluster.etcd.url)[d1.url].epoch == 2


def test_role_switch_under_load_decode_to_prefill_and_back(cluster: Cluster) -> None:
    d2 = cluster.d2
    unified = [cluster.unified[(p, 8)] for p in PROMPTS]
    assert outputs(cluster.url)[:3] == unified
    with Load(cluster.url, [(p, 8) for p in SHORT] + [("Once upon a time", 32)]) as load:
        load.wait_for(3)
        r = httpx.post(d2.url + "/switch_role", json={"role": "prefill"}, timeout=300)
        assert r.status_code == 200, r.text
        to_prefill = r.json()
        assert (to_prefill["role"], to_prefill["epoch"], to_prefill["switched"]) == ("prefill", 2, True)
        assert to_prefill["seconds"] < SWITCH_S and to_prefill["registered"]
        wait_until(lambda: cluster.routable(d2.url, "prefill"), 10, "D2 routable as a prefill")
        load.wait_for(6)
        assert cluster.worker(d2.url).processed > 0, "the router sends D2 prefill legs"
    load.check(cluster.unified)
    assert outputs(cluster.url)[:3] == unified
    info = httpx.get(d2.url + "/server_info", timeout=5).json()
    assert (info["disaggregation_mode"], info["epoch"], info["draining"]) == ("prefill", 2, False)
    record = records(cluster.etcd.url)[d2.url]
    assert (record.role, record.epoch, record.bootstrap_port) == ("prefill", 2, to_prefill["bootstrap_port"])

    # the old epoch: a leg naming it gets 409; a route lookup naming it gets 409, and a decode paired
    # through it recomputes the prompt itself (same text), never taking KV of another role
    body = {"model": "default", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    r = httpx.post(d2.url + "/v1/completions", json={**body, EPOCH: 1}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == STALE_EPOCH
    boot = f"http://127.0.0.1:{record.bootstrap_port}"
    assert httpx.get(boot + "/route?rank=0&epoch=1", timeout=5).status_code == 409
    assert httpx.get(boot + "/route?rank=0&epoch=2", timeout=5).status_code == 200
    paired = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": record.bootstrap_port,
              "bootstrap_room": random.getrandbits(63), BOOTSTRAP_EPOCH: 1}
    r = httpx.post(cluster.d1.url + "/v1/completions", json=paired, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == unified[0], r.text

    with Load(cluster.url, [(p, 8) for p in SHORT]) as back_load:
        back_load.wait_for(3)
        r = httpx.post(d2.url + "/switch_role", json={"role": "decode"}, timeout=300)
        assert r.status_code == 200 and r.json()["epoch"] == 3 and r.json()["seconds"] < SWITCH_S, r.text
        wait_until(lambda: cluster.routable(d2.url, "decode"), 10, "D2 routable as a decode again")
        back_load.wait_for(4)
    back_load.check(cluster.unified)
    assert outputs(cluster.url)[:3] == unified
    print(f"switch to prefill {to_prefill['seconds']:.2f} s (drain {to_prefill['drain_s']:.2f}, swap "
          f"{to_prefill['swap_s']:.3f}, register {to_prefill['register_s']:.3f}); back {r.json()['seconds']:.2f} s; "
          f"{len(load.results) + len(back_load.results)} requests, 0 failed")
    for s in (cluster.p, cluster.d1, d2):
        wait_until(lambda s=s: _settled(s.url), 30, f"{s.url} idle with its pool back")
        assert _load(s.url)["integrity_errors"] == 0


# decode ITL = 0.05 + 0.02 * streams + 0.00001 * KV tokens; prefill 2 ms per token. With a 150 ms ITL SLO a
# decode holds 4 short streams: a decode-heavy load needs decodes, a prefill-heavy one (2 output tokens)
# almost only prefills: the fill split of 3 workers is 1P 2D, then 2P 1D.
PROFILE = Profile(model="default", kv_capacity_tokens=6000, max_concurrency=32,
                  prefill=[PrefillPoint(10, 0.02), PrefillPoint(1000, 2.0)],
                  decode=[DecodePoint(1, 0, 0.07), DecodePoint(8, 0, 0.21), DecodePoint(1, 1000, 0.08),
                          DecodePoint(8, 1000, 0.22)])


def test_planner_switches_a_decode_when_the_mix_turns_prefill_heavy(cluster: Cluster, tmp_path: Path) -> None:
    assert [w["role"] for w in discovered(cluster.url)["workers"]].count("decode") == 2
    log = tmp_path / "decisions.jsonl"
    cfg = PlannerConfig(ttft_slo_ms=4000, itl_slo_ms=150, max_workers=3, interval_s=3.0, predictor="last", fill=True)
    with open(log, "w") as f:
        live = LivePlanner(LiveConfig(cluster.url, 3.0, stable=2, cooldown_s=0.001), Planner(cfg, PROFILE),
                           LocalConnector(cluster.url), PlannerMetrics(), f)
        live.tick()  # the baseline snapshot
        with Load(cluster.url, [("Once upon a time", 32)], threads=2) as decode_heavy:
            for _ in range(3):
                decode_heavy.wait_for(1, 120)
                rec = live.tick()
                assert rec is not None and not rec["actions"], rec
                assert (rec["decision"]["prefill"], rec["decision"]["decode"]) == (1, 2), rec
        decode_heavy.check(cluster.unified)
        switched: dict[str, Any] | None = None
        with Load(cluster.url, [(p, 2) for p in LONG], threads=2) as prefill_heavy:
            deadline = time.monotonic() + 240
            while switched is None and time.monotonic() < deadline:
                prefill_heavy.wait_for(1, 120)
                rec = live.tick()
                assert rec is not None
                switched = next((a for a in rec["actions"] if a["kind"] == "switch"), None)
            assert switched is not None, live.records[-3:]
            prefill_heavy.wait_for(2)
        prefill_heavy.check(cluster.unified)
    assert switched["ok"] and switched["role"] == "prefill" and switched["detail"]["switched"], switched
    assert rec["observed"]["prompt_tokens"] > 300 and rec["decision"]["prefill"] == 2, rec
    wait_until(lambda: cluster.routable(switched["url"], "prefill"), 10, "the switched worker routes as prefill")
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == len(live.records) and any(line["actions"] for line in lines)
    print(f"planner: switched {switched['url']} to prefill in {switched['seconds']:.2f} s after "
          f"{len(live.records)} intervals")
    with contextlib.suppress(httpx.HTTPError):  # leave the cluster as the module found it
        httpx.post(switched["url"] + "/switch_role", json={"role": "decode"}, timeout=120)
