"""Router in regular mode over mock workers: balancing, retries, health, circuit, streaming, overload.

Mock workers and the router run in threads of this process (127.0.0.1, free ports); every
wait is bounded; each test stops what it started.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.router.config import (CircuitConfig, HealthConfig, LimitsConfig, PolicyConfig, RetryConfig, RouterConfig,
                                   WorkerSpec)
from pdserve.router.server import EmbeddedRouter
from tests.mock_worker import MockWorker, wait_until

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, success_threshold=1,
                           load_interval_s=0.1)
BODY = {"model": "mock", "prompt": "hello", "max_tokens": 3}


def make_cfg(workers: list[MockWorker], **kw) -> RouterConfig:
    kw.setdefault("policy", PolicyConfig("round_robin"))
    kw.setdefault("retry", RetryConfig(max_attempts=3, initial_backoff_s=0.01))
    return RouterConfig(port=0, workers=tuple(WorkerSpec(w.url) for w in workers), health=FAST_HEALTH, **kw)


@pytest.fixture
def workers() -> Iterator[list[MockWorker]]:
    ws = [MockWorker().start(), MockWorker().start()]
    yield ws
    for w in ws:
        w.kill()


def test_round_robin_and_request_ids(workers: list[MockWorker]) -> None:
    with EmbeddedRouter(make_cfg(workers)) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        answers = [c.post("/v1/completions", json=BODY) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert sorted(a.json()["mock_worker"]["worker"] for a in answers) == sorted([w.url for w in workers] * 2)
        rids = [a.headers["x-request-id"] for a in answers]
        assert len(set(rids)) == 4
        seen = [rec.headers.get("x-request-id") for w in workers for rec in w.records]
        assert sorted(seen) == sorted(rids)
        mine = c.post("/v1/completions", json=BODY, headers={"X-Request-Id": "client-id-7"})
        assert mine.headers["x-request-id"] == "client-id-7"
        for path, body in (("/generate", {"text": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            assert c.post(path, json=body).status_code == 200
        assert c.get("/v1/models").json()["data"][0]["id"] == "mock"


def test_500_is_retried_on_another_worker(workers: list[MockWorker]) -> None:
    bad, good = workers
    bad.configure(fail_status=500)
    with EmbeddedRouter(make_cfg(workers)) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        answers = [c.post("/v1/completions", json=BODY) for _ in range(6)]
        assert all(a.status_code == 200 and a.json()["mock_worker"]["worker"] == good.url for a in answers)
        assert bad.counts().get("failed", 0) >= 2
        assert 'sgl_router_retries_total{route="/v1/completions"}' in c.get("/metrics").text


def test_every_attempt_failing_returns_the_workers_error(workers: list[MockWorker]) -> None:
    for w in workers:
        w.configure(fail_status=503)
    with EmbeddedRouter(make_cfg(workers)) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        resp = c.post("/v1/completions", json=BODY)
        assert resp.status_code == 503 and resp.json()["error"]["message"] == "mock failure 503"
        assert sum(w.counts()["received"] for w in workers) == 3  # max_attempts, no more


def test_client_errors_are_not_retried(workers: list[MockWorker]) -> None:
    one = workers[0]
    one.configure(fail_status=400)
    with EmbeddedRouter(make_cfg([one])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        resp = c.post("/v1/completions", json=BODY)
        assert resp.status_code == 400 and one.counts()["received"] == 1


def test_dead_worker_is_ejected_its_circuit_opens_and_it_comes_back(workers: list[MockWorker]) -> None:
    dead, alive = workers
    cfg = make_cfg(workers, circuit=CircuitConfig(failure_threshold=2, success_threshold=1, open_duration_s=0.5))
    with EmbeddedRouter(cfg) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        dead.kill()
        statuses = [c.post("/v1/completions", json=BODY).status_code for _ in range(6)]
        assert statuses == [200] * 6  # requests that hit the dead one were retried on the other

        def state() -> dict:
            return next(w for w in c.get("/workers").json()["workers"] if w["url"] == dead.url)

        wait_until(lambda: not state()["healthy"], what="health checks to eject the dead worker")
        assert state()["circuit"] in ("open", "half_open") and c.get("/readiness").status_code == 200
        assert r.app.registry.get(dead.url).breaker.opened_count >= 1
        assert f'sgl_router_worker_health{{role="regular",worker="{dead.url}"}} 0.0' in c.get("/metrics").text
        dead.revive()
        wait_until(lambda: state()["healthy"] and state()["circuit"] == "closed", what="the worker to come back")
        seen = {c.post("/v1/completions", json=BODY).json()["mock_worker"]["worker"] for _ in range(4)}
        assert seen == {dead.url, alive.url}


def test_restarted_worker_serves_within_5_s_of_answering_health() -> None:
    """Fast rejoin: the circuit of a dead worker stays open for 60 s by config, yet the worker
    gets traffic again within 5 s of its health check answering (a half-open probe at once)."""
    port_worker = MockWorker()
    health = HealthConfig(interval_s=10.0, timeout_s=1.0, failure_threshold=1, success_threshold=1)
    cfg = RouterConfig(port=0, workers=(WorkerSpec(port_worker.url),), health=health,
                       retry=RetryConfig(max_attempts=1), policy=PolicyConfig("round_robin"),
                       circuit=CircuitConfig(failure_threshold=2, success_threshold=2, open_duration_s=60.0))
    port_worker.start()
    try:
        with EmbeddedRouter(cfg) as r, httpx.Client(base_url=r.url, timeout=10) as c:
            assert c.post("/v1/completions", json=BODY).status_code == 200
            port_worker.kill()
            statuses = {c.post("/v1/completions", json=BODY).status_code for _ in range(3)}
            assert statuses <= {502, 503}, statuses
            assert r.app.registry.get(port_worker.url).breaker.state == "open"
            port_worker.revive()  # same address
            back = time.monotonic()
            wait_until(lambda: c.post("/v1/completions", json=BODY).status_code == 200, timeout=5,
                       what="the restarted worker to serve again")
            print(f"restarted worker served again {time.monotonic() - back:.2f} s after it was back")
    finally:
        port_worker.kill()


def test_streaming_is_relayed_unbuffered(workers: list[MockWorker]) -> None:
    slow = workers[0]
    slow.configure(token_delay_s=0.4)
    with EmbeddedRouter(make_cfg([slow])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        t0 = time.monotonic()
        arrivals = []
        with c.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 4, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream") and "x-request-id" in s.headers
            for line in s.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - t0)
        assert len(arrivals) == 5  # 4 tokens + [DONE]
        assert arrivals[0] < 0.35 and arrivals[-1] > 1.1  # the first token did not wait for the last


def test_client_disconnect_cancels_the_worker_request(workers: list[MockWorker]) -> None:
    slow = workers[0]
    slow.configure(latency_s=5.0)
    with EmbeddedRouter(make_cfg([slow])) as r:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/completions", json=BODY, timeout=0.5)
        wait_until(lambda: slow.counts().get("cancelled") == 1, timeout=3, what="the worker to see the cancel")
        assert r.app.registry.get(slow.url).in_flight == 0


def test_overload_answers_only_200_429_408(workers: list[MockWorker]) -> None:
    slow = workers[0]
    slow.configure(latency_s=0.6)
    limits = LimitsConfig(max_concurrent=2, queue_size=2, queue_timeout_s=0.3)
    with EmbeddedRouter(make_cfg([slow], limits=limits)) as r:
        with httpx.Client(base_url=r.url, timeout=10) as c, cf.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: c.post("/v1/completions", json=BODY).status_code, range(12)))
            metrics = c.get("/metrics").text
    assert set(statuses) <= {200, 429, 408}
    assert statuses.count(200) >= 2 and 429 in statuses and 408 in statuses
    assert 'sgl_router_rejected_total{reason="queue_full"}' in metrics


def test_no_routable_worker_gives_503_and_not_ready() -> None:
    gone = MockWorker()  # never started: its port refuses connections
    with EmbeddedRouter(make_cfg([gone])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        ready = c.get("/readiness")
        assert ready.status_code == 503 and ready.json()["workers"]["regular"]["routable"] == 0
        resp = c.post("/v1/completions", json=BODY)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_workers"
        assert c.get("/health").status_code == 200


def test_power_of_two_follows_get_load(workers: list[MockWorker]) -> None:
    busy, idle = workers
    busy.configure(extra_load=50)
    with EmbeddedRouter(make_cfg(workers, policy=PolicyConfig("power_of_two"))) as r, \
            httpx.Client(base_url=r.url, timeout=10) as c:
        wait_until(lambda: r.app.registry.get(busy.url).load == 50, what="the load monitor")
        got = {c.post("/v1/completions", json=BODY).json()["mock_worker"]["worker"] for _ in range(8)}
        assert got == {idle.url}


def test_cache_aware_keeps_a_prefix_on_one_worker(workers: list[MockWorker]) -> None:
    with EmbeddedRouter(make_cfg(workers, policy=PolicyConfig("cache_aware"))) as r, \
            httpx.Client(base_url=r.url, timeout=10) as c:
        prompt = "You are a helpful assistant. " * 10
        first = c.post("/v1/completions", json={**BODY, "prompt": prompt + "Q1"}).json()["mock_worker"]["worker"]
        for q in ("Q2", "Q3", "Q4"):
            assert c.post("/v1/completions", json={**BODY, "prompt": prompt + q}).json()["mock_worker"]["worker"] \
                == first
        other = c.post("/v1/completions", json={**BODY, "prompt": "Something else entirely " * 10})
        assert other.json()["mock_worker"]["worker"] != first  # no match: the emptier tree
        bad = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
