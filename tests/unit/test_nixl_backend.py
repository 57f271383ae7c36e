"""The nixl backend's local pieces: descriptor segments, notification bookkeeping, the one-line
error when the package is missing, and one in-process prefill -> decode room over NIXL."""

from __future__ import annotations


import numpy as np
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, MetadataRecord
from pdserve.disagg.transfer import KVPoll, create_manager

import pdserve.disagg.transfer.backends.nixl as nixl_backend  # noqa: E402  (CI installs the extra: never skipped)
parse_notif, NotifCollector = nixl_backend.parse_notif, nixl_backend.NotifCollector



def test_parse_notif() -> None:
    assert parse_notif(b"123:4") == (123, 4)
    assert parse_notif(b"garbage") is None and parse_notif(b"1:2:3") is None and parse_notif(b"a:b") is None


def test_notif_collector_counts_per_agent_and_room_and_forgets() -> None:
    inbox: list[dict[str, list[bytes]]] = []
    live = {1, 2}
    c = NotifCollector(lambda: inbox.pop() if inbox else {}, lambda room: room in live)
    inbox.append({"P1": [b"1:0", b"1:1", b"1:1", b"2:5", b"9:0", b"junk"], "P2": [b"1:7"]})
    c.drain()
    assert c.count("P1", 1) == 2 and c.count("P2", 1) == 1 and c.count(None, 1) == 3
    assert c.count("P1", 2) == 1 and c.count("P1", 9) == 0  # room 9 is not live: dropped
    c.forget(1)
    assert c.count(None, 1) == 0 and len(c) == 1
    live.discard(2)  # room 2 went terminal: dropped at the next drain
    c.drain()
    assert len(c) == 0


def test_in_process_room() -> None:
    shape = (2, 16 * 4, 2, 16)
    k, v = torch.randn(shape), torch.randn(shape)
    layout = KVLayout.for_pool("tiny", k, 4)
    dk, dv = torch.zeros(shape), torch.zeros(shape)
    with create_manager("nixl", "prefill", k, v, 4, layout, DisaggConfig()) as p, \
            create_manager("nixl", "decode", dk, dv, 4, layout, DisaggConfig()) as d:
        r, s = d.receiver(5, p.endpoint), p.sender(5)
        r.init([3, 4, 9])
        assert s.wait(10, until=KVPoll.WaitingForInput) == KVPoll.WaitingForInput
        s.send([1, 2], 0, False)
        s.send([6], 2, True, MetadataRecord(room=5, first_token=1))
        assert s.wait(10) == KVPoll.Success and r.wait(10) == KVPoll.Success
        for a, b in ((1, 3), (2, 4), (6, 9)):
            assert torch.equal(dk[:, b * 4:(b + 1) * 4], k[:, a * 4:(a + 1) * 4])
            assert torch.equal(dv[:, b * 4:(b + 1) * 4], v[:, a * 4:(a + 1) * 4])
        assert np.count_nonzero(dk[:, :12].numpy()) == 0  # pages 0..2 untouched
        assert len(d._notifs) == 0  # the room's chunk set was forgotten
