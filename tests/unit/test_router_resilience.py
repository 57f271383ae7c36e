"""Circuit breaker, limiter, retry backoff, config and CLI parsing of the router (no sockets)."""

from __future__ import annotations

import argparse
import asyncio
import random

import pytest

from pdserve.router.cli import add_router_arguments, config_from_args
from pdserve.router.config import CircuitConfig, RetryConfig, RouterConfig, WorkerSpec, normalize_url
from pdserve.router.request import RouterError
from pdserve.router.resilience import (CLOSED, HALF_OPEN, OPEN, CircuitBreaker, ConcurrencyLimiter, backoff_s,
                                       breaker_failure, retryable_status)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(CircuitConfig(failure_threshold=3, success_threshold=2, open_duration_s=10), clock)
    b.record(False)
    b.record(False)
    b.record(True)  # a success resets the count
    b.record(False)
    b.record(False)
    assert b.state == CLOSED and b.allow()
    b.record(False)
    assert b.state == OPEN and not b.allow()
    clock.t = 9.9
    assert not b.allow()
    clock.t = 10.0
    assert b.allow() and b.state == HALF_OPEN
    b.record(False)  # a failed trial re-opens at once
    assert b.state == OPEN and b.opened_count == 2
    clock.t = 20.0
    assert b.allow()
    b.record(True)
    assert b.state == HALF_OPEN
    b.record(True)
    assert b.state == CLOSED


def test_trial_half_opens_an_open_breaker_at_once() -> None:
    clock = Clock()
    b = CircuitBreaker(CircuitConfig(failure_threshold=1, success_threshold=1, open_duration_s=60), clock)
    b.trial()  # closed: nothing to do
    assert b.state == CLOSED
    b.record(False)
    assert b.state == OPEN and not b.allow()
    clock.t = 1.0
    b.trial()  # a good health check: a trial now, not after 60 s
    assert b.state == HALF_OPEN and b.allow()
    b.record(True)
    assert b.state == CLOSED


def test_disabled_breaker_always_allows() -> None:
    b = CircuitBreaker(CircuitConfig(enabled=False, failure_threshold=1))
    for _ in range(5):
        b.record(False)
    assert b.allow()


def test_retry_classification_and_backoff() -> None:
    assert all(retryable_status(s) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(retryable_status(s) for s in (200, 400, 401, 404, 413, 422))
    assert breaker_failure(500) and not breaker_failure(429) and not breaker_failure(408)
    cfg = RetryConfig(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0, jitter=0.2)
    rng = random.Random(0)
    for i, base in enumerate([0.1, 0.2, 0.4, 0.5, 0.5]):
        for _ in range(20):
            assert base * 0.8 - 1e-9 <= backoff_s(cfg, i, rng) <= base * 1.2 + 1e-9
    assert backoff_s(RetryConfig(initial_backoff_s=0.1, jitter=0.0), 0) == pytest.approx(0.1)


def test_limiter_queue_full_timeout_and_handoff() -> None:
    async def run() -> None:
        lim = ConcurrencyLimiter(max_concurrent=1, queue_size=1, queue_timeout_s=0.2)
        await lim.acquire()
        waiter = asyncio.create_task(lim.acquire())
        await asyncio.sleep(0)
        assert lim.queued == 1
        with pytest.raises(RouterError) as full:
            await lim.acquire()
        assert full.value.status == 429
        lim.release()  # hands the slot to the waiter
        await waiter
        assert lim.active == 1 and lim.queued == 0
        with pytest.raises(RouterError) as late:
            await lim.acquire()  # queued, then times out
        assert late.value.status == 408
        lim.release()
        assert lim.active == 0
        await lim.acquire()  # the slot is free again
        lim.release()

    asyncio.run(run())


def test_limiter_disabled() -> None:
    async def run() -> None:
        lim = ConcurrencyLimiter(-1, 0, 1.0)
        for _ in range(100):
            await lim.acquire()
        assert not lim.enabled

    asyncio.run(run())


def test_worker_urls_and_config_validation() -> None:
    assert normalize_url("127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert normalize_url("http://[::1]:9") == "http://[::1]:9"
    for bad in ("https://x:1", "http://x:1/v1", "http://:1", "http://x:99999"):
        with pytest.raises(ValueError):
            normalize_url(bad)
    with pytest.raises(ValueError):
        WorkerSpec("http://x:1", "decode", bootstrap_port=8998)
    with pytest.raises(ValueError):
        RouterConfig(workers=(WorkerSpec("http://x:1"), WorkerSpec("x:1")))
    with pytest.raises(ValueError):
        RouterConfig(pd=True, workers=(WorkerSpec("http://x:1"),))
    with pytest.raises(Exception):
        RouterConfig().port = 1  # frozen


def parse(*argv: str) -> RouterConfig:
    p = argparse.ArgumentParser()
    add_router_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_cli_pd_and_regular() -> None:
    cfg = parse("--pd-disaggregation", "--prefill", "http://a:1", "8998", "--prefill", "http://b:2",
                "--prefill", "http://c:3", "none", "--decode", "http://d:4", "--policy", "random",
                "--decode-policy", "power_of_two", "--disable-retries", "--max-concurrent-requests", "8")
    assert cfg.pd and cfg.host == "127.0.0.1"
    assert [(w.url, w.role, w.bootstrap_port) for w in cfg.workers] == [
        ("http://a:1", "prefill", 8998), ("http://b:2", "prefill", None), ("http://c:3", "prefill", None),
        ("http://d:4", "decode", None)]
    assert cfg.policy_for("prefill").name == "random" and cfg.policy_for("decode").name == "power_of_two"
    assert cfg.retry.max_attempts == 1 and cfg.limits.max_concurrent == 8
    reg = parse("--worker-urls", "http://a:1", "http://b:2", "--api-key", "k")
    assert not reg.pd and len(reg.workers) == 2 and reg.worker_key == "k"
    for bad in (["--prefill", "http://a:1"], ["--pd-disaggregation", "--prefill", "http://a:1", "x"],
                ["--pd-disaggregation", "--prefill", "http://a:1", "1", "2"]):
        with pytest.raises(ValueError):
            parse(*bad)


def test_limiter_hands_slots_out_by_priority_then_arrival() -> None:
    async def run() -> list[str]:
        lim = ConcurrencyLimiter(max_concurrent=1, queue_size=10, queue_timeout_s=5.0)
        await lim.acquire()
        order: list[str] = []

        async def one(name: str, priority: int) -> None:
            await lim.acquire(priority)
            order.append(name)
            lim.release()

        tasks = []
        for name, priority in (("low-a", 5), ("high-a", 0), ("low-b", 5), ("high-b", 0), ("urgent", -1)):
            tasks.append(asyncio.create_task(one(name, priority)))
            await asyncio.sleep(0)  # each one queued before the next arrives
        lim.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["urgent", "high-a", "high-b", "low-a", "low-b"]
