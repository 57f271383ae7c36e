"""What a prefill rank remembers about rooms that have no live sender (both bounded, oldest out).

  ended    room -> how it ended ("succeeded" or the failure): a late RoomInfo for it is refused.
  aborts   room -> (reason, when): an AbortRoom that came before the room's sender existed (the
           client left while the busy engine had not taken the request yet). `take_abort` at
           sender creation fails the room at once; `expire` drops entries older than the
           bootstrap timeout, when such a sender would have timed out anyway.

Not thread-safe on its own: SendSessions calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict

LIMIT = 65536  # rooms remembered of each kind


class RoomMemory:
    def __init__(self, ttl_s: float, limit: int = LIMIT) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.ended: OrderedDict[int, str] = OrderedDict()
        self.aborts: OrderedDict[int, tuple[str, float]] = OrderedDict()

    def end(self, room: int, how: str) -> None:
        self.ended[room] = how
        self.ended.move_to_end(room)
        while len(self.ended) > self.limit:
            self.ended.popitem(last=False)

    def abort_early(self, room: int, reason: str, now: float) -> None:
        self.aborts[room] = (reason, now)
        self.aborts.move_to_end(room)
        while len(self.aborts) > self.limit:
            self.aborts.popitem(last=False)

    def take_abort(self, room: int) -> str | None:
        hit = self.aborts.pop(room, None)
        return None if hit is None else hit[0]

    def expire(self, now: float) -> None:
        while self.aborts:
            room, (_, t) = next(iter(self.aborts.items()))
            if now - t <= self.ttl_s:
                return
            del self.aborts[room]
