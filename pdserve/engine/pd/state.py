"""Per-request PD state a `Request` carries while its KV moves (`Request.transfer`).

Kept apart from the stages so `engine/request.py` can name the types without importing the
stages (which import `Request`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg import KVReceiver, KVSender
from pdserve.engine.messages import Bootstrap


@dataclass(eq=False)
class PrefillTransfer:
    """A prefill request's room: its sender and how many of its pages were pushed so far."""

    sender: KVSender
    room: int
    started: float = 0.0
    pages_sent: int = 0  # send cursor (prompt pages); starts past the decode's cached prefix
    skip_pages: int = 0  # prompt pages the decode holds already (RoomInfo.decode_prefix_len): never sent
    aborting: bool = False
    error: str | None = None  # why prefill itself gave the room up (answered once it is terminal)


@dataclass(eq=False)
class DecodeTransfer:
    """A decode request's room: where its KV comes from and, once pages are reserved, its receiver."""

    boot: Bootstrap
    receiver: KVReceiver | None = None
    decode_prefix_len: int = 0  # prompt tokens served by this decode's prefix cache (locked; not moved)
    num_pages: int = 0  # pages the prefill writes (the prompt's past the prefix)
    started: float = 0.0  # receiver.init time
    aborting: bool = False
    error: str | None = None


Transfer = PrefillTransfer | DecodeTransfer
