"""KV transfer between real processes (spawned agents on 127.0.0.1) for the tcp, shm and fake
backends: bytes land exactly, failures end in terminal states on both sides, nothing hangs.

Four agents start once for the module: prefill P and decode D (the main pair), plus a prefill
and a decode that get killed. Each agent holds one tiny KV pool (2 layers, 2 KV heads, head dim
16, page size 4, 64 pages; random) and one manager per backend; P's bootstrap server has
backend i registered as rank i.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pdserve.disagg.bootstrap_client import BootstrapClient
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, LayoutMismatch
from pdserve.disagg.transfer import KVPoll, create_manager
from pdserve.disagg.transfer.backends.shm_pool import sweep_stale_pools
from tests.transfer_harness import Agent, AgentSpec, close_all

BACKENDS = ["tcp", "shm", "fake", "nixl", "mooncake"]
HB = {"heartbeat_interval": 0.5, "heartbeat_max_failure": 2}
NUM_PAGES, PAGE_SIZE, LAYERS = 64, 4, 2
S = KVPoll
_rooms = itertools.count(random.Random().randrange(1 << 40) << 20)


def room() -> int:
    return next(_rooms)


@pytest.fixture(scope="module")
def agents() -> Iterator[dict[str, Agent]]:
    specs = {"P": AgentSpec(role="prefill", backends=BACKENDS, seed=1),
             "D": AgentSpec(role="decode", backends=BACKENDS, seed=2, config=HB),
             "PV": AgentSpec(role="prefill", backends=BACKENDS, seed=3),
             "DV": AgentSpec(role="decode", backends=BACKENDS, seed=4, config=HB)}
    started: dict[str, Agent] = {}
    try:
        for name, spec in specs.items():
            started[name] = Agent(spec)
        for agent in started.values():
            agent.wait_ready(120)
        yield started
    finally:
        close_all(list(started.values()))
        sweep_stale_pools()


def endpoint(decode: Agent, prefill: Agent, backend: str) -> str:
    return decode.call("route", host="127.0.0.1", port=prefill.info["bootstrap_port"],
                       rank=BACKENDS.index(backend))["endpoint"]


def pool(agent: Agent) -> dict[str, np.ndarray]:
    raw = agent.call("pool")
    return {kv: np.frombuffer(raw[kv], dtype=np.uint8).reshape(LAYERS, NUM_PAGES, -1) for kv in ("k", "v")}


def meta(r: int) -> dict:
    return {"room": r, "first_token": 1234, "logprob": -0.5, "top_logprobs": [[1234, -0.5], [7, -1.25]],
            "cached_tokens": 8}


def open_room(P: Agent, D: Agent, backend: str, dst: list[int], prefill_manager: str | None = None) -> int:
    """A room with its receiver initialised and its sender past bootstrap."""
    r = room()
    ep = P.call("info")["endpoints"][prefill_manager] if prefill_manager else endpoint(D, P, backend)
    D.call("receiver", backend=backend, room=r, endpoint=ep)
    P.call("sender", backend=prefill_manager or backend, room=r)
    D.call("init", room=r, pages=dst)
    got = P.call("wait", room=r, seconds=10, until=int(S.WaitingForInput))
    assert got["state"] == S.WaitingForInput and got["num_dst_pages"] == len(dst), got
    return r


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_arrive_byte_exact_in_chunks(agents: dict[str, Agent], backend: str) -> None:
    P, D = agents["P"], agents["D"]
    rng = random.Random(backend)
    src = rng.sample(range(1, NUM_PAGES), 10)
    dst = rng.sample(range(1, NUM_PAGES), 12)  # 12 reserved, 10 sent: two must stay untouched
    before = pool(D)
    r = open_room(P, D, backend, dst)
    P.call("send", room=r, src=src[:4], start=0, is_last=False)
    P.call("send", room=r, src=src[4:7], start=4, is_last=False)
    P.call("send", room=r, src=src[7:], start=7, is_last=True, metadata=meta(r))
    assert P.call("wait", room=r, seconds=10)["state"] == S.Success
    got = D.call("wait", room=r, seconds=10)
    assert got["state"] == S.Success and got["metadata"] == meta(r), got
    after, source = pool(D), pool(P)
    expected = {kv: before[kv].copy() for kv in before}
    if backend != "fake":  # fake moves no bytes
        for s, d in zip(src, dst):
            for kv in ("k", "v"):
                expected[kv][:, d] = source[kv][:, s]
    for kv in ("k", "v"):
        assert np.array_equal(after[kv], expected[kv]), f"{backend}: {kv} pages differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_prefix_pages_are_skipped(agents: dict[str, Agent], backend: str) -> None:
    """A decode holding the prompt's first 2 pages (decode_prefix_len 8) names only the 3 past
    them; the prefill sends in prompt page order and only pages 2..4 move, to dst 0..2. A full
    hit (no page reserved) still ends in Success with the metadata."""
    P, D = agents["P"], agents["D"]
    rng = random.Random(backend + "prefix")
    src = rng.sample(range(1, NUM_PAGES), 5)
    dst = rng.sample(range(1, NUM_PAGES), 3)
    before = pool(D)
    r = room()
    D.call("receiver", backend=backend, room=r, endpoint=endpoint(D, P, backend))
    P.call("sender", backend=backend, room=r)
    D.call("init", room=r, pages=dst, decode_prefix_len=2 * PAGE_SIZE)
    got = P.call("wait", room=r, seconds=10, until=int(S.WaitingForInput))
    assert (got["num_dst_pages"], got["decode_prefix_len"]) == (3, 2 * PAGE_SIZE), got
    P.call("send", room=r, src=src[:1], start=0, is_last=False)  # all below the prefix: nothing moves
    P.call("send", room=r, src=src[1:3], start=1, is_last=False)  # page 1 dropped, page 2 -> dst[0]
    P.call("send", room=r, src=src[3:], start=3, is_last=True, metadata=meta(r))
    assert P.call("wait", room=r, seconds=10)["state"] == S.Success
    assert D.call("wait", room=r, seconds=10)["state"] == S.Success
    after, source = pool(D), pool(P)
    expected = {kv: before[kv].copy() for kv in before}
    if backend != "fake":
        for s, d in zip(src[2:], dst):
            for kv in ("k", "v"):
                expected[kv][:, d] = source[kv][:, s]
    for kv in ("k", "v"):
        assert np.array_equal(after[kv], expected[kv]), f"{backend}: {kv} pages differ"
    r = room()
    D.call("receiver", backend=backend, room=r, endpoint=endpoint(D, P, backend))
    P.call("sender", backend=backend, room=r)
    D.call("init", room=r, pages=[], decode_prefix_len=2 * PAGE_SIZE)
    assert P.call("wait", room=r, seconds=10, until=int(S.WaitingForInput))["num_dst_pages"] == 0
    P.call("send", room=r, src=src[:2], start=0, is_last=True, metadata=meta(r))
    assert P.call("wait", room=r, seconds=10)["state"] == S.Success
    got = D.call("wait", room=r, seconds=10)
    assert got["state"] == S.Success and got["metadata"] == meta(r), got
    assert np.array_equal(pool(D)["k"], after["k"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_on_either_side_ends_both(agents: dict[str, Agent], backend: str) -> None:
    P, D = agents["P"], agents["D"]
    for aborter in (P, D):
        r = open_room(P, D, backend, [1, 2, 3])
        P.call("send", room=r, src=[5], start=0, is_last=False)
        aborter.call("abort", room=r)
        s, d = P.call("wait", room=r, seconds=10), D.call("wait", room=r, seconds=10)
        assert s["state"] == S.Failed and d["state"] == S.Failed, (s, d)
        assert "abort" in s["failure"] and "abort" in d["failure"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_failures_end_cleanly(agents: dict[str, Agent], backend: str) -> None:
    P, D = agents["P"], agents["D"]
    # 16 rooms at fail_rate 0.5: both outcomes show up but for 2 in 65536 runs (8 rooms at 0.3
    # saw no failure in ~6% of runs)
    P.call("manager", name=f"faulty-{backend}", backend=backend, overrides={"fail_rate": 0.5})
    rooms = []
    for i in range(16):
        r = open_room(P, D, backend, [10 + i], prefill_manager=f"faulty-{backend}")
        P.call("send", room=r, src=[20 + i], start=0, is_last=True, metadata=meta(r))
        rooms.append(r)
    outcomes = []
    for r in rooms:
        s, d = P.call("wait", room=r, seconds=10), D.call("wait", room=r, seconds=10)
        assert s["state"] == d["state"] and s["state"] in (S.Success, S.Failed), (s, d)
        if s["state"] == S.Failed:
            assert "injected" in s["failure"] and "injected" in d["failure"]
        outcomes.append(s["state"])
    assert S.Failed in outcomes and S.Success in outcomes, outcomes


def test_bootstrap_timeout_without_decode(agents: dict[str, Agent]) -> None:
    P = agents["P"]
    rooms = {}
    for backend in BACKENDS:
        P.call("manager", name=f"impatient-{backend}", backend=backend, overrides={"bootstrap_timeout": 1.0})
        rooms[backend] = room()
        P.call("sender", backend=f"impatient-{backend}", room=rooms[backend])
    t0 = time.monotonic()
    for backend, r in rooms.items():
        got = P.call("wait", room=r, seconds=10)
        assert got["state"] == S.Failed and "bootstrap timeout" in got["failure"], (backend, got)
    assert 0.9 < time.monotonic() - t0 < 4.0


def test_waiting_timeout_without_prefill_sender(agents: dict[str, Agent]) -> None:
    P = agents["P"]
    k = torch.zeros(LAYERS, NUM_PAGES * PAGE_SIZE, 2, 16)
    layout = KVLayout.for_pool("tiny", k, PAGE_SIZE)
    with create_manager("fake", "decode", k, k.clone(), PAGE_SIZE, layout, DisaggConfig(waiting_timeout=1.0)) as mgr:
        r = mgr.receiver(room(), P.info["endpoints"]["fake"])
        r.init([1, 2])
        assert r.wait(5) == S.Failed and "timed out waiting for KV" in (r.failure or "")


def test_layout_mismatch_is_refused_clearly(agents: dict[str, Agent]) -> None:
    P = agents["P"]
    k = torch.zeros(LAYERS, NUM_PAGES * 8, 2, 16)
    wrong = KVLayout.for_pool("tiny", k, 8)  # page size 8 where prefill has 4
    client = BootstrapClient(wrong, DisaggConfig(), heartbeat=False, fetch_timeout=5)
    try:
        with pytest.raises(LayoutMismatch, match=r"page_size \(decode=8, prefill [0-9.:]+=4\)"):
            client.get_route("127.0.0.1", P.info["bootstrap_port"])
    finally:
        client.close()
    # a decode that skips the bootstrap check is refused by the transfer session itself
    with create_manager("tcp", "decode", k, k.clone(), 8, wrong, DisaggConfig()) as mgr:
        r = mgr.receiver(room(), P.info["endpoints"]["tcp"])
        r.init([1])
        assert r.wait(10) == S.Failed
        assert "layout mismatch" in r.failure and "page_size (prefill=4, decode=8)" in r.failure


def test_decode_killed_mid_transfer(agents: dict[str, Agent]) -> None:
    P, DV, D = agents["P"], agents["DV"], agents["D"]
    rooms = {b: open_room(P, DV, b, [1, 2, 3, 4]) for b in BACKENDS}
    for r in rooms.values():
        P.call("send", room=r, src=[7, 8], start=0, is_last=False)
    shm_path = DV.info["shm_path"]
    DV.kill()
    for r in rooms.values():
        P.call("send", room=r, src=[9, 10], start=2, is_last=True, metadata=meta(r))
    for b, r in rooms.items():
        got = P.call("wait", room=r, seconds=10)
        assert got["state"] == S.Failed and "decode connection lost" in got["failure"], (b, got)
    # the prefill is healthy: a fresh transfer to the surviving decode works
    r = open_room(P, D, "tcp", [30])
    P.call("send", room=r, src=[31], start=0, is_last=True, metadata=meta(r))
    assert P.call("wait", room=r, seconds=10)["state"] == S.Success
    sweep_stale_pools()  # the killed decode could not unlink its shared pool
    assert not os.path.exists(shm_path)


def test_hung_prefill_fails_rooms_only_when_no_write_can_land(agents: dict[str, Agent]) -> None:
    """SIGSTOP the prefill: the heartbeat declares it dead. tcp/fake rooms fail at once (decode
    does its own writes); the shm room must not, since the stopped process still maps decode's
    pool, until the resumed prefill confirms with RoomFailed."""
    PV, D = agents["PV"], agents["D"]
    rooms = {b: open_room(PV, D, b, [50, 51]) for b in BACKENDS}
    bound = HB["heartbeat_interval"] * HB["heartbeat_max_failure"] + 3.0
    os.kill(PV.pid, signal.SIGSTOP)
    try:
        for b in ("tcp", "fake"):
            got = D.call("wait", room=rooms[b], seconds=bound)
            assert got["state"] == S.Failed and "heartbeat" in got["failure"], (b, got)
        got = D.call("state", room=rooms["shm"])
        assert got["state"] == S.WaitingForInput and "heartbeat" in got["failure"], got
    finally:
        os.kill(PV.pid, signal.SIGCONT)
    got = D.call("wait", room=rooms["shm"], seconds=10)
    assert got["state"] == S.Failed, got


def test_prefill_killed_mid_transfer(agents: dict[str, Agent]) -> None:
    PV, D = agents["PV"], agents["D"]
    rooms = {b: open_room(PV, D, b, [40, 41, 42]) for b in BACKENDS}
    for r in rooms.values():
        PV.call("send", room=r, src=[3], start=0, is_last=False)
    PV.kill()
    t0 = time.monotonic()
    bound = HB["heartbeat_interval"] * HB["heartbeat_max_failure"] + 3.0
    for b, r in rooms.items():
        got = D.call("wait", room=r, seconds=bound)
        assert got["state"] == S.Failed, (b, got)
    assert time.monotonic() - t0 < bound
    assert D.call("ping")["pid"] == D.pid  # the decode is healthy
