"""One room's state on one side: the forward-only state machine plus write gating.

Lifecycle of a RoomState:

    Bootstrapping --advance--> WaitingForInput --advance--> Transferring --succeed--> Success
          \\______________________ fail(reason) ____________________________/
                       |
                  "failing": the reason is recorded at once (first reason wins), poll() keeps
                  answering the last forward state until the room is quiet, then Failed:
                    - no local writer between begin_write() and end_write(), and
                    - no remote writer that may still write (`remote_writer`: one-sided
                      backends, where the prefill process writes into decode memory itself).

A terminal state is what frees pages, so it is never reported while a write may land. Once poll()
has reported a terminal state it sticks. `on_terminal` runs (outside the lock) when the room
becomes terminal, so managers can drop it from their tables.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pdserve.disagg.transfer.base import TERMINAL, KVPoll, advance


class RoomState:
    def __init__(self, room: int, on_terminal: Callable[[RoomState], None] | None = None) -> None:
        self.room = room
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = KVPoll.Bootstrapping
        self._failure: str | None = None
        self._writers = 0
        self._remote_writer = False
        self._observed = False
        self._on_terminal = on_terminal

    # --- forward progress ---------------------------------------------------------------------

    def advance(self, new: KVPoll) -> None:
        """Move forward to `new` (never to a terminal state; use succeed/fail)."""
        assert new not in TERMINAL
        with self._lock:
            if self._failure is None and self._state not in TERMINAL:
                self._state = advance(self._state, new)
                self._changed.notify_all()

    def succeed(self) -> bool:
        """Success unless failing or already terminal; returns True when it took effect."""
        with self._lock:
            if self._failure is not None or self._state in TERMINAL:
                return False
            self._state = KVPoll.Success
            self._remote_writer = False
            self._changed.notify_all()
        self._fire()
        return True

    # --- failure ------------------------------------------------------------------------------

    def fail(self, reason: str) -> bool:
        """Record a failure (first reason wins); returns True the first time. The room turns
        Failed once quiet. A reported (observed) terminal state is never changed."""
        with self._lock:
            if self._observed or self._failure is not None:
                return False
            self._failure = reason
            became = self._settle_locked()
        if became:
            self._fire()
        return True

    @property
    def failing(self) -> bool:
        return self._failure is not None

    @property
    def failure(self) -> str | None:
        return self._failure

    # --- write gating -------------------------------------------------------------------------

    def begin_write(self) -> bool:
        """Enter a write into this room's pages; False (and no write may happen) once failing."""
        with self._lock:
            if self._failure is not None or self._state in TERMINAL:
                return False
            self._writers += 1
            return True

    def end_write(self) -> None:
        with self._lock:
            self._writers -= 1
            assert self._writers >= 0
            became = self._settle_locked()
        if became:
            self._fire()

    def set_remote_writer(self, live: bool) -> None:
        """One-sided backends: whether the peer process may still write this room's pages."""
        with self._lock:
            self._remote_writer = live
            became = self._settle_locked() if not live else False
        if became:
            self._fire()

    @property
    def remote_writer(self) -> bool:
        return self._remote_writer

    # --- reading ------------------------------------------------------------------------------

    @property
    def state(self) -> KVPoll:
        """Current state without marking a terminal one as reported."""
        return self._state

    def poll(self) -> KVPoll:
        with self._lock:
            if self._state in TERMINAL:
                self._observed = True
            return self._state

    def wait_change(self, timeout: float, seen: KVPoll) -> None:
        """Block until the state differs from `seen`, at most `timeout` s (tests and tools)."""
        with self._changed:
            if self._state == seen:
                self._changed.wait(timeout)

    # --- internals ----------------------------------------------------------------------------

    def _settle_locked(self) -> bool:
        if self._failure is None or self._writers or self._remote_writer or self._state == KVPoll.Failed:
            return False
        self._state = KVPoll.Failed
        self._changed.notify_all()
        return True

    def _fire(self) -> None:
        if self._on_terminal is not None:
            self._on_terminal(self)
