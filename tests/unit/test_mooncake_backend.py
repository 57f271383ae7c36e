"""The mooncake backend's local logic: protocol selection, region checks, run merging and the
segment addresses (checked by applying them as memmoves between two real pools), the missing
package message, and the stale-segment guard (engine rotation) with a real in-process engine."""

from __future__ import annotations


import msgspec
import pytest
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import Hello, KVLayout, MetadataRecord, MooncakeRegion
from pdserve.disagg.transfer import KVPoll, create_manager
from pdserve.disagg.transfer.backends.remote_pool import pool_region
from pdserve.disagg.transfer.sessions.identity import local_identity
from pdserve.disagg.transfer.sessions.wire import SessionClosed

import pdserve.disagg.transfer.backends.mooncake as mc  # noqa: E402  (CI installs the extra: never skipped)

L, H, D, PS = 3, 2, 4, 2  # slot_bytes = 2 * 4 * 4 = 32, span = 64


def test_protocol_selection() -> None:
    assert mc.engine_protocol(DisaggConfig()) == ("tcp", "")
    assert mc.engine_protocol(DisaggConfig(ib_device="mlx5_0,mlx5_1")) == ("rdma", "mlx5_0,mlx5_1")
    assert mc.engine_protocol(DisaggConfig(mooncake_protocol="tcp", ib_device="mlx5_0")) == ("rdma", "mlx5_0")
    with pytest.raises(ValueError, match="needs an RDMA device.*--disaggregation-ib-device"):
        mc.engine_protocol(DisaggConfig(mooncake_protocol="rdma"))
    env = {"PDSERVE_DISAGGREGATION_MOONCAKE_PROTOCOL": "rdma", "PDSERVE_DISAGGREGATION_IB_DEVICE": "mlx5_2"}
    assert mc.engine_protocol(DisaggConfig.from_env(env)) == ("rdma", "mlx5_2")


def _pool(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(L, 16 * PS, H, D, generator=gen), torch.randn(L, 16 * PS, H, D, generator=gen)


def test_open_region_rotates_engine_for_a_reused_session_id() -> None:
    k, v = _pool(1)
    layout = KVLayout.for_pool("tiny", k, PS)
    with create_manager("mooncake", "prefill", k, v, PS, layout, DisaggConfig()) as mgr:
        pool = pool_region(*_pool(2))
        body = msgspec.msgpack.encode(MooncakeRegion(session_id="10.0.0.9:15001", pool=pool))

        def hello(instance: str) -> Hello:
            ident = msgspec.structs.replace(local_identity("127.0.0.1"), instance=instance)
            return Hello(identity=ident, layout=layout, backend="mooncake", region=body)

        first = mgr.open_region(hello("a"))
        assert mgr.open_region(hello("a")).engine is first.engine  # the same decode reconnecting
        second = mgr.open_region(hello("b"))  # a new decode at the same host:port
        assert second.engine is not first.engine and len(mgr._engines) == 2
        assert mgr.open_region(hello("b")).engine is second.engine
        with pytest.raises(ValueError, match="do not match the prefill"):
            bad = msgspec.msgpack.encode(MooncakeRegion("x:1", msgspec.structs.replace(pool, slot_bytes=8)))
            mgr.open_region(msgspec.structs.replace(hello("c"), region=bad))
        with pytest.raises(ValueError, match="outside decode's pool"):
            mgr.write_pages(None, first, 1, [(0, 15, 2)], None)  # type: ignore[arg-type]
        mgr.close_region(first)
        with pytest.raises(SessionClosed, match="closed"):
            mgr.write_pages(None, first, 1, [(0, 0, 1)], None)  # type: ignore[arg-type]


def test_decode_reborn_at_the_same_session_id_gets_fresh_bytes() -> None:
    """A closed decode manager's engine goes back to the process pool; the next decode manager
    gets it, so the same session id now names another pool, and the prefill must write that one.
    (In one process the engine and its data port stay the same; the harmful case, a decode
    process restarted at the same rpc port, is what the engine rotation above guards against.)"""
    k, v = _pool(3)
    layout = KVLayout.for_pool("tiny", k, PS)
    with create_manager("mooncake", "prefill", k, v, PS, layout, DisaggConfig()) as prefill:
        session_ids = []
        for room in (1, 2):
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            with create_manager("mooncake", "decode", dk, dv, PS, layout, DisaggConfig()) as decode:
                session_ids.append(decode.session_id)
                r, s = decode.receiver(room, prefill.endpoint), prefill.sender(room)
                r.init([4, 9])
                assert s.wait(10, until=KVPoll.WaitingForInput) == KVPoll.WaitingForInput
                s.send([room, 7], 0, True, MetadataRecord(room=room, first_token=1))
                assert (s.wait(10), r.wait(10)) == (KVPoll.Success, KVPoll.Success), (s.failure, r.failure)
                for a, b in ((room, 4), (7, 9)):
                    assert torch.equal(dk[:, b * PS:(b + 1) * PS], k[:, a * PS:(a + 1) * PS])
                    assert torch.equal(dv[:, b * PS:(b + 1) * PS], v[:, a * PS:(a + 1) * PS])
        assert session_ids[0] == session_ids[1]  # pooled engine: this is the stale-segment case
