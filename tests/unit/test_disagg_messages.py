"""Wire messages (layout check, msgpack round trips) and the room state machine."""

from __future__ import annotations

import msgspec
import pytest
import torch

from pdserve.disagg.messages import (Done, Hello, KVLayout, LayoutMismatch, MetadataRecord, PeerIdentity, RoomInfo,
                                     session_decoder, session_encoder)
from pdserve.disagg.transfer.base import KVPoll, advance
from pdserve.disagg.transfer.rooms.state import RoomState

LAYOUT = KVLayout(model="m", num_layers=2, kv_heads=2, head_dim=16, dtype="float32", page_size=4)


def test_layout_from_pool_and_sizes() -> None:
    k = torch.zeros(2, 8 * 4, 2, 16)
    assert KVLayout.for_pool("m", k, 4) == LAYOUT
    assert LAYOUT.span_bytes == 4 * 2 * 16 * 4 and LAYOUT.page_bytes == 2 * 2 * LAYOUT.span_bytes
    LAYOUT.check_pool(k, k.clone())
    with pytest.raises(ValueError, match="dtype"):
        LAYOUT.check_pool(k.half(), k.half())


def test_layout_mismatch_names_every_differing_field() -> None:
    LAYOUT.check_compatible(KVLayout(**msgspec.structs.asdict(LAYOUT)))
    other = msgspec.structs.replace(LAYOUT, page_size=16, dtype="bfloat16")
    with pytest.raises(LayoutMismatch) as err:
        LAYOUT.check_compatible(other)
    msg = str(err.value)
    assert "page_size (decode=4, prefill=16)" in msg and "dtype (decode='float32', prefill='bfloat16')" in msg
    assert "num_layers" not in msg and "model" not in msg


def test_session_messages_round_trip() -> None:
    ident = PeerIdentity(instance="i", host="h", boot_id="b", pid=1, start_time=2)
    record = MetadataRecord(room=2**62 + 5, first_token=42, logprob=-0.25, top_logprobs=[(42, -0.25), (7, -2.0)],
                            cached_tokens=16)
    for msg in (Hello(identity=ident, layout=LAYOUT, backend="tcp", token=None, region=b"\x00\x01"),
                RoomInfo(room=2**62 + 5, dst_pages=[3, 4, 9], decode_id="d"),
                Done(room=2**62 + 5, num_frames=3, metadata=record)):
        assert session_decoder.decode(session_encoder.encode(msg)) == msg
    with pytest.raises(msgspec.DecodeError):
        session_decoder.decode(msgspec.msgpack.encode({"type": "Nope"}))


def test_state_machine_forward_only_failed_wins() -> None:
    S = KVPoll
    assert S.Failed < S.Bootstrapping < S.WaitingForInput < S.Transferring < S.Success
    assert advance(S.Bootstrapping, S.Transferring) == S.Transferring
    assert advance(S.Transferring, S.WaitingForInput) == S.Transferring  # never backwards
    assert advance(S.Success, S.Bootstrapping) == S.Success
    for s in S:
        assert advance(s, S.Failed) == S.Failed  # Failed always wins


def test_room_state_fails_only_when_quiet() -> None:
    ended: list[KVPoll] = []
    r = RoomState(1, on_terminal=lambda st: ended.append(st.state))
    r.advance(KVPoll.WaitingForInput)
    assert r.begin_write()
    r.advance(KVPoll.Transferring)
    assert r.fail("boom") and not r.fail("second reason")
    assert r.poll() == KVPoll.Transferring and r.failure == "boom"  # a write is in hand
    assert not r.begin_write()  # no new write once failing
    r.end_write()
    assert r.poll() == KVPoll.Failed and ended == [KVPoll.Failed]
    assert not r.succeed() and r.poll() == KVPoll.Failed


def test_room_state_remote_writer_gates_failure() -> None:
    r = RoomState(2)
    r.set_remote_writer(True)
    r.fail("peer lost")
    assert r.poll() == KVPoll.Bootstrapping  # the peer may still write: not terminal
    r.set_remote_writer(False)
    assert r.poll() == KVPoll.Failed


def test_room_state_reported_terminal_sticks() -> None:
    r = RoomState(3)
    assert r.succeed() and r.poll() == KVPoll.Success
    assert not r.fail("late") and r.poll() == KVPoll.Success
    r2 = RoomState(4)
    r2.succeed()
    r2.fail("before anyone looked")  # not yet reported: Failed wins
    assert r2.poll() == KVPoll.Failed
