"""Per-request PD state a `Request` carries while its KV moves (`Request.transfer`).

Kept apart from the stages so `engine/request.py` can name the types without importing the
stages (which import `Request`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg.transfer.base import KVReceiver, KVSender
from pdserve.engine.messages import Bootstrap


@dataclass(eq=False)
class PrefillTransfer:
    """A prefill request's room: its sender and how many of its pages were pushed so far."""

    sender: KVSender
    room: int
    started: float = 0.0
    pages_sent: int = 0
    aborting: bool = False
    error: str | None = None  # why prefill itself gave the room up (answered once it is terminal)


@dataclass(eq=False)
class DecodeTransfer:
    """A decode request's room: where its KV comes from and, once pages are reserved, its receiver."""

    boot: Bootstrap
    receiver: KVReceiver | None = None
    started: float = 0.0  # receiver.init time
    aborting: bool = False
    error: str | None = None


Transfer = PrefillTransfer | DecodeTransfer
