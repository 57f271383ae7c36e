"""Prefill/decode disaggregation: config, wire messages, bootstrap server/client, KV transfer.

A transport library: it knows nothing of the engine. The engine sees this package through the
names below only (never a submodule; tests/unit/test_structure.py holds it to that):

    config      DisaggConfig                     the PD flags and knobs of a server
    layout      KVLayout, LayoutMismatch         what both sides' pools must agree on
    rooms       open_rooms(config, layout, tensors, page_size, tp) -> ServerRooms (TPChannel: the
                tensor-parallel ranks), join_rooms(...) on ranks > 0, shared_kv_pool(...) for a
                shm decode's pool; a room is a KVSender (prefill) or KVReceiver (decode) that the
                stages poll (KVPoll) and whose Done carries a MetadataRecord
    bootstrap   publish_routes(config, rooms.ranks, dp_rank, dp_size) -> BootstrapServer (prefill),
                BootstrapClient (decode: routes(host, port, room, epoch), heartbeat), StaleEpoch
                (the prefill is at another role epoch: 409)

server_rooms.py tells the lifecycle, transfer/base.py the per-room states, transfer/ holds the
backends, sessions, rooms and tensor-parallel links and control; docs/architecture.md the protocol.

The names load lazily: `pdserve.disagg.config` (read by `pdserve serve --help`) must not pull in
torch through the wire messages or the transfer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.disagg.bootstrap import BootstrapServer, publish_routes
    from pdserve.disagg.bootstrap_client import BootstrapClient, StaleEpoch
    from pdserve.disagg.config import DisaggConfig
    from pdserve.disagg.messages import KVLayout, LayoutMismatch, MetadataRecord
    from pdserve.disagg.server_rooms import ServerRooms, TPChannel, join_rooms, open_rooms, shared_kv_pool
    from pdserve.disagg.transfer.base import KVPoll, KVReceiver, KVSender

_HOME = {  # name -> the module that defines it
    "DisaggConfig": "config",
    "KVLayout": "messages",
    "LayoutMismatch": "messages",
    "MetadataRecord": "messages",
    "KVPoll": "transfer.base",
    "KVReceiver": "transfer.base",
    "KVSender": "transfer.base",
    "ServerRooms": "server_rooms",
    "TPChannel": "server_rooms",
    "open_rooms": "server_rooms",
    "join_rooms": "server_rooms",
    "shared_kv_pool": "server_rooms",
    "BootstrapServer": "bootstrap",
    "publish_routes": "bootstrap",
    "BootstrapClient": "bootstrap_client",
    "StaleEpoch": "bootstrap_client",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pdserve.disagg' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pdserve.disagg.{home}"), name)
