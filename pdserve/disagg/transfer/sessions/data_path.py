"""What the two session halves need from the manager they serve: its identity and layout, and
the backend's six data-path hooks (see manager.py for the per-backend table).

    SessionTransferManager ──owns──> SendSessions (prefill)  ─┐
       (implements DataPath)  └─owns──> ReceiveSessions (decode) ┴─uses──> DataPath (this module)

The halves hold a DataPath, not the manager class, so manager.py imports them and they
import only this module: no circle. `IncomingRoom` is the part of a decode-side room that
`read_frame` and `check_done` may read or count on.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import DataFrame, Done, HeadSlice, Hello, KVLayout, PeerIdentity
from pdserve.disagg.transfer.backends.pages import Run
from pdserve.disagg.transfer.rooms.state import RoomState
from pdserve.disagg.transfer.sessions.wire import FrameSocket


class IncomingRoom(Protocol):
    room: int
    state: RoomState
    dst_set: frozenset[int]  # the pages decode reserved for this room
    frames: int  # DataFrames written into them so far (the session's reader thread only)
    heads: HeadSlice | None  # the slice of the prefill's heads this room takes (None: all)

    @property
    def peer(self) -> PeerIdentity | None: ...


class DataPath(Protocol):
    backend_name: str
    one_sided: bool  # True: the prefill process writes into decode memory itself
    identity: PeerIdentity
    layout: KVLayout
    config: DisaggConfig
    host: str
    num_pages: int

    def hello_region(self) -> bytes: ...

    def open_region(self, hello: Hello) -> Any: ...

    def close_region(self, region: Any) -> None: ...

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int: ...

    def read_frame(self, sock: FrameSocket, frame: DataFrame, receiver: IncomingRoom | None) -> None: ...

    def check_done(self, receiver: IncomingRoom, done: Done) -> str | None: ...
