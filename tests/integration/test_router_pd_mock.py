"""Router in PD mode over mock prefill/decode workers: bootstrap injection, streaming, logprob merge,
fail-fast cancellation of the other leg, retries on a new pair, PD readiness.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.mock_worker import MockWorker, wait_until

HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, success_threshold=1)


def pd_cfg(prefills: list[tuple[MockWorker, int | None]], decodes: list[MockWorker], **kw) -> RouterConfig:
    kw.setdefault("retry", RetryConfig(max_attempts=2, initial_backoff_s=0.01))
    specs = [WorkerSpec(p.url, "prefill", port) for p, port in prefills] + [WorkerSpec(d.url, "decode")
                                                                           for d in decodes]
    return RouterConfig(port=0, pd=True, workers=tuple(specs), policy=PolicyConfig("round_robin"), health=HEALTH, **kw)


@pytest.fixture
def pd() -> Iterator[tuple[MockWorker, MockWorker]]:
    p, d = MockWorker("prefill", bootstrap_port=7777).start(), MockWorker("decode").start()
    yield p, d
    p.kill()
    d.kill()


def test_bootstrap_fields_reach_both_legs(pd: tuple[MockWorker, MockWorker]) -> None:
    p, d = pd
    with EmbeddedRouter(pd_cfg([(p, 8998)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        bodies = {"/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 3}},
                  "/v1/completions": {"prompt": "hi", "max_tokens": 3},
                  "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
        for path, body in bodies.items():
            resp = c.post(path, json=body)
            assert resp.status_code == 200, resp.text
            info = resp.json()["meta_info"] if path == "/generate" else resp.json()["mock_worker"]
            assert info["role"] == "decode"  # the decode's answer is the client's
        # the router answers with the decode leg; the prefill leg may be recorded a moment later
        wait_until(lambda: len(p.generation_records()) == 3, 10, "the prefill leg of every request")
        prefill_by_room = {r.body["bootstrap_room"]: r for r in p.generation_records()}
        rooms = set()
        for dec in d.generation_records():
            pre = prefill_by_room[dec.body["bootstrap_room"]]
            assert pre.path == dec.path
            for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
                assert pre.body[key] == dec.body[key]
            assert pre.body["bootstrap_host"] == "127.0.0.1" and pre.body["bootstrap_port"] == 8998
            room = pre.body["bootstrap_room"]
            assert isinstance(room, int) and 0 <= room < 2**63
            rooms.add(room)
            assert pre.headers["x-request-id"] == dec.headers["x-request-id"]
        assert len(rooms) == 3
        c.post("/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1}})
        batch = d.generation_records()[-1].body
        assert len(batch["bootstrap_room"]) == 2 and batch["bootstrap_port"] == [8998, 8998]


def test_bootstrap_port_comes_from_server_info(pd: tuple[MockWorker, MockWorker]) -> None:
    p, d = pd
    with EmbeddedRouter(pd_cfg([(p, None)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
        assert d.generation_records()[0].body["bootstrap_port"] == 7777
        assert c.get("/workers").json()["workers"][0]["bootstrap_port"] == 7777


def test_decode_stream_is_unbuffered_and_logprobs_are_merged(pd: tuple[MockWorker, MockWorker]) -> None:
    p, d = pd
    d.configure(token_delay_s=0.4)
    with EmbeddedRouter(pd_cfg([(p, 1)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "return_logprob": True}
        whole = c.post("/generate", json=body).json()
        assert whole["meta_info"]["input_token_logprobs"] == [[-0.5, 0, None], [-0.5, 1, None], [-0.5, 2, None]]
        assert len(whole["meta_info"]["output_token_logprobs"]) == 4
        t0, arrivals, events = time.monotonic(), [], []
        with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - t0)
                    events.append(line)
        assert arrivals[0] < 0.35 and arrivals[-1] > 1.1
        assert events[-1] == "data: [DONE]"
        assert all('"input_token_logprobs":[[-0.5,0,null]' in e.replace(" ", "") for e in events[:-1])
        assert c.post("/generate", json={"text": "hi"}).json()["meta_info"].get("input_token_logprobs") is None


def test_dead_prefill_fails_fast_and_cancels_the_decode(pd: tuple[MockWorker, MockWorker]) -> None:
    p, d = pd
    p.configure(latency_s=30.0)  # the prefill "works" on the prompt...
    d.configure(decode_wait_s=30.0)  # ...and the decode waits for its KV
    cfg = pd_cfg([(p, 1)], [d], retry=RetryConfig(max_attempts=1))
    with EmbeddedRouter(cfg) as r:
        result: dict = {}

        def call() -> None:
            t0 = time.monotonic()
            result["resp"] = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=20)
            result["s"] = time.monotonic() - t0

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: d.in_flight == 1 and p.in_flight == 1, what="both legs to arrive")
        p.kill()  # the prefill dies mid-request
        t.join(10)
        assert result["resp"].status_code == 502 and result["s"] < 5
        assert result["resp"].json()["error"]["code"] == "worker_disconnect"
        wait_until(lambda: d.counts().get("cancelled") == 1, timeout=15, what="the decode leg to be cancelled")
        assert r.app.registry.get(d.url).in_flight == 0
        metrics = httpx.get(r.url + "/metrics").text
        assert 'sgl_router_pd_transfer_failures_total{leg="prefill",reason="disconnect"} 1.0' in metrics


def test_failing_decode_cancels_the_prefill(pd: tuple[MockWorker, MockWorker]) -> None:
    p, d = pd
    p.configure(latency_s=30.0)
    d.configure(fail_status=500)
    with EmbeddedRouter(pd_cfg([(p, 1)], [d])) as r:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=20)
        assert resp.status_code == 500 and time.monotonic() - t0 < 5
        assert d.counts()["received"] == 2  # one retry on a new pair (here: the same workers, a new room)
        # a prefill leg is cancelled, never completed; on a loaded machine the decode's 500 can come
        # back before the prefill leg's request was even written, and then the prefill never sees it
        # (a leg that reached the prefill and was not cancelled would run for 30 s)
        wait_until(lambda: all(rec.outcome != "running" for rec in p.generation_records()),
                   timeout=15, what="the prefill legs to end")
        assert {rec.outcome for rec in p.generation_records()} <= {"cancelled"}
        decode_rooms = {rec.body["bootstrap_room"] for rec in d.generation_records()}
        assert len(decode_rooms) == 2
        assert {rec.body["bootstrap_room"] for rec in p.generation_records()} <= decode_rooms


def test_prefill_500_is_retried_on_another_prefill(pd: tuple[MockWorker, MockWorker]) -> None:
    bad, d = pd
    good = MockWorker("prefill").start()
    try:
        # the bad prefill's 500 comes first (a real decode waits for KV), once the decode has its leg
        bad.configure(fail_status=500, after_peer=d)
        d.configure(decode_wait_s=0.3)
        with EmbeddedRouter(pd_cfg([(bad, 1), (good, 2)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
            assert [c.post("/v1/completions", json={"prompt": "x"}).status_code for _ in range(4)] == [200] * 4
            # each request ends on a pair with the good prefill; some first tried the bad one (the
            # decode legs of a request may be recorded in either order, so count, not position)
            ports = [rec.body["bootstrap_port"] for rec in d.generation_records()]
            assert ports.count(2) == 4 and ports.count(1) >= 1, ports
    finally:
        good.kill()


def test_pd_readiness_needs_a_prefill_and_a_decode() -> None:
    p = MockWorker("prefill").start()
    d = MockWorker("decode")  # not started yet
    try:
        with EmbeddedRouter(pd_cfg([(p, 1)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
            ready = c.get("/readiness")
            assert ready.status_code == 503 and ready.json()["workers"]["prefill"]["routable"] == 1
            assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
            d.start()
            wait_until(lambda: c.get("/readiness").status_code == 200, what="readiness")
            assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    finally:
        p.kill()
        d.kill()


def test_client_400_is_relayed_and_not_a_failed_leg(pd: tuple[MockWorker, MockWorker]) -> None:
    """The prefill's 400 comes first (router/pd.py, client errors): relayed as is, the decode leg
    cancelled at once, nothing retried, no leg counted as failed."""
    p, d = pd
    p.configure(fail_status=400, after_peer=d)  # the 400 once the decode has its leg: no race
    d.configure(decode_wait_s=30.0)  # the decode waits for KV that never comes
    with EmbeddedRouter(pd_cfg([(p, 1)], [d])) as r:
        resp = httpx.post(r.url + "/v1/completions", json={"prompt": ["a", "b"], "n": 2}, timeout=20)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"] == "mock failure 400"  # the prefill's own body
        assert p.counts()["received"] == d.counts()["received"] == 1  # a client's error is not retried
        wait_until(lambda: d.counts().get("cancelled") == 1, 10, "the decode leg to be cancelled")
        assert len(d.generation_records()[0].body["bootstrap_room"]) == 4  # one room per sequence
        metrics = httpx.get(r.url + "/metrics").text
        assert "sgl_router_pd_transfer_failures_total{" not in metrics  # no leg counted as failed
        assert 'sgl_router_pd_client_errors_total{leg="prefill",status="400"} 1.0' in metrics


def test_client_errors_are_not_transfer_failures(pd: tuple[MockWorker, MockWorker]) -> None:
    """A leg's 400 about the client's body is the client's error, counted apart from failed legs."""
    p, d = pd
    # the first request: the prefill's 400 comes first (once the decode has its leg)...
    p.configure(fail_status=400, fail_count=1, after_peer=d)
    d.configure(latency_s=0.5)
    with EmbeddedRouter(pd_cfg([(p, 1)], [d])) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 400
        d.configure(latency_s=0.0, fail_status=400)  # ...the second: the decode answers 400
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 400
        assert d.counts()["received"] == 2  # a 400 is not retried
        metrics = c.get("/metrics").text
        assert 'sgl_router_pd_client_errors_total{leg="prefill",status="400"} 1.0' in metrics
        assert 'sgl_router_pd_client_errors_total{leg="decode",status="400"} 1.0' in metrics
        assert "sgl_router_pd_transfer_failures_total{" not in metrics
