"""The frames of a tensor-parallel server's transfer channel (rank 0 <-> rank r), msgspec only.

    rank 0 ── Command ─────▶ rank r      OpenSender, SendPages, OpenReceiver, AbortRank, PeerDead,
                                         StopAgent (hub.py sends them, agent.py runs them)
    rank 0 ◀── ToRank0 ───── rank r      RankHello once (its endpoint and layout), then a
                                         RankUpdate per state change of each of its rooms

The channel's address goes through the TP group's store under STORE_KEY: rank 0's hub publishes
it, each rank's agent looks it up.
"""

from __future__ import annotations

from typing import Union

import msgspec

from pdserve.disagg.messages import KVLayout, LinkSpec, MetadataRecord

STORE_KEY = "pdserve/tp_transfer"


class RankHello(msgspec.Struct, frozen=True, tag=True):
    rank: int
    endpoint: str
    layout: KVLayout


class OpenSender(msgspec.Struct, frozen=True, tag=True):
    room: int


class SendPages(msgspec.Struct, frozen=True, tag=True):
    room: int
    src_pages: list[int]
    start_page: int
    is_last: bool
    metadata: MetadataRecord | None


class OpenReceiver(msgspec.Struct, frozen=True, tag=True):
    room: int
    dst_pages: list[int]
    links: list[LinkSpec]
    decode_prefix_len: int = 0  # prompt tokens the decode holds: dst_pages are the pages past them


class AbortRank(msgspec.Struct, frozen=True, tag=True):
    room: int


class PeerDead(msgspec.Struct, frozen=True, tag=True):
    endpoint: str
    reason: str


class StopAgent(msgspec.Struct, frozen=True, tag=True):
    pass


class RankUpdate(msgspec.Struct, frozen=True, tag=True):
    room: int
    state: int
    failure: str | None


Command = Union[OpenSender, SendPages, OpenReceiver, AbortRank, PeerDead, StopAgent]
ToRank0 = Union[RankHello, RankUpdate]
command_decoder = msgspec.msgpack.Decoder(Command)  # rank r reads rank 0's commands
to_rank0_decoder = msgspec.msgpack.Decoder(ToRank0)  # rank 0 reads the ranks' hellos and updates
encode = msgspec.msgpack.Encoder().encode
