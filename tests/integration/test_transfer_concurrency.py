"""Many rooms at once, in this process: one prefill manager serving two decode managers (so
several shard queues and sessions), chunked sends, random aborts from either side and injected
failures. Every room must end in the same terminal state on both sides, successes byte-exact."""

from __future__ import annotations

import random
import time

import pytest
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, MetadataRecord
from pdserve.disagg.transfer import KVPoll, create_manager
from pdserve.disagg.transfer.backends.shm_pool import allocate_shared_pool

L, H, D, PS, PAGES = 2, 2, 16, 4, 256


@pytest.mark.parametrize("backend", ["tcp", "shm", "nixl", "mooncake"])
def test_concurrent_rooms_with_aborts_and_failures(backend: str) -> None:
    rng = random.Random(7)
    shape = (L, PAGES * PS, H, D)
    k, v = torch.randn(shape), torch.randn(shape)
    layout = KVLayout.for_pool("tiny", k, PS)
    pools = [allocate_shared_pool(shape, torch.float32) for _ in range(2)]
    prefill = create_manager(backend, "prefill", k, v, PS, layout, DisaggConfig(queue_size=3, fail_rate=0.05))
    decodes = [create_manager(backend, "decode", p.k, p.v, PS, layout, DisaggConfig()) for p in pools]
    try:
        free = [list(range(1, PAGES)) for _ in decodes]
        rooms = []
        for i in range(48):
            d = i % 2
            n = rng.randint(1, 6)
            dst = [free[d].pop(rng.randrange(len(free[d]))) for _ in range(n)]
            src = rng.sample(range(1, PAGES), n)
            r = decodes[d].receiver(1000 + i, prefill.endpoint)
            s = prefill.sender(1000 + i)
            r.init(dst)
            rooms.append((d, s, r, src, dst))
        for d, s, r, src, dst in rooms:
            assert s.wait(10, until=KVPoll.WaitingForInput) >= KVPoll.WaitingForInput
            action = rng.random()
            half = len(src) // 2
            if half:
                s.send(src[:half], 0, False)
            if action < 0.1:
                s.abort()
            elif action < 0.2:
                r.abort()
            s.send(src[half:], half, True, MetadataRecord(room=s.room, first_token=3))
        outcomes = []
        for d, s, r, src, dst in rooms:
            ss, rs = s.wait(10), r.wait(10)
            assert ss in (KVPoll.Success, KVPoll.Failed) and ss == rs, (s.failure, r.failure)
            outcomes.append(ss)
            if ss == KVPoll.Success:
                assert r.metadata().room == s.room
                for a, b in zip(src, dst):
                    assert torch.equal(pools[d].k[:, b * PS:(b + 1) * PS], k[:, a * PS:(a + 1) * PS])
                    assert torch.equal(pools[d].v[:, b * PS:(b + 1) * PS], v[:, a * PS:(a + 1) * PS])
        assert outcomes.count(KVPoll.Success) >= 24 and KVPoll.Failed in outcomes
    finally:
        prefill.close()
        for m in decodes:
            m.close()
        for p in pools:
            p.close()


def test_an_abort_before_the_sender_exists_fails_it_at_once() -> None:
    """Decode gave a room up (AbortRoom) before the busy prefill engine created its sender: the
    abort is remembered, so the sender fails the moment it is created instead of waiting for a
    page list that never comes (its bootstrap timeout); a room never aborted still works."""
    shape = (L, 32 * PS, H, D)
    k, v = torch.randn(shape), torch.randn(shape)
    layout = KVLayout.for_pool("tiny", k, PS)
    prefill = create_manager("tcp", "prefill", k, v, PS, layout, DisaggConfig(bootstrap_timeout=60))
    decode = create_manager("tcp", "decode", torch.zeros(shape), torch.zeros(shape), PS, layout, DisaggConfig())
    try:
        r = decode.receiver(501, prefill.endpoint)
        r.init([1, 2])  # RoomInfo reaches the prefill: no sender yet, so it waits there
        r.abort()  # the client left: AbortRoom, still before the sender
        assert r.wait(10) == KVPoll.Failed
        memory = prefill._prefill._memory  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while 501 not in memory.aborts:  # the AbortRoom is on its way (the session's writer thread)
            assert time.monotonic() < deadline, "the prefill never got the AbortRoom"
            time.sleep(0.01)
        s = prefill.sender(501)  # the engine takes the request only now
        assert s.wait(2) == KVPoll.Failed and "gave up" in (s.failure or ""), s.failure
        ok_r, ok_s = decode.receiver(502, prefill.endpoint), prefill.sender(502)
        ok_r.init([3])
        assert ok_s.wait(10, until=KVPoll.WaitingForInput) == KVPoll.WaitingForInput
        ok_s.send([5], 0, True, MetadataRecord(room=502, first_token=3))
        assert ok_s.wait(10) == KVPoll.Success and ok_r.wait(10) == KVPoll.Success
    finally:
        decode.close()
        prefill.close()
