"""The manager shared by pdserve's own backends: a control session per (decode, prefill) pair
plus a backend-specific data path, plugged in through six hooks.

Lifecycle: `__init__` registers the pool (the backend's view of it) and starts the role's half,
which sees this manager only as a DataPath (data_path.py):
  prefill -> SendSessions: listens on `endpoint` (host:port, published via the bootstrap server),
             accepts decode sessions, runs the sharded send queues;
  decode  -> ReceiveSessions: opens a session to each prefill endpoint on first use.
`close()` fails the live rooms (telling the peer), stops the threads (bounded joins) and closes
the sockets. A backend subclass sets `backend_name` / `one_sided` and overrides the hooks:

  hook                 side     tcp                   shm                   nixl                     mooncake
  hello_region()       decode   b""                   ShmRegion of our pool NixlRegion: agent meta-  MooncakeRegion: session
                                                                            data + PoolRegion        id + PoolRegion
  open_region(hello)   prefill  None                  map decode's pool     add_remote_agent         check pool; pick an
                                                                            (refcounted)             engine without a stale
                                                                                                     segment for that id
  close_region(r)      prefill  -                     drop the mapping      remove the agent after   mark closed
                                                                            in-flight xfers
  write_pages(...)     prefill  send DataFrames       copy into the mapping one WRITE + notif per    batch_transfer_sync_write
                                                                            call; returns 1          of merged segments
  read_frame(...)      decode   payload -> dst pages  (protocol error)      (protocol error)         (protocol error)
  check_done(r, done)  decode   frames received       -                     num_frames notifs seen   -
                                == sent
(fake: every hook does nothing.) One-sided backends address decode's pool by base address
(backends/remote_pool.py); completion per room is announced by Done on the control session either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import DataFrame, Done, HeadSlice, Hello, KVLayout
from pdserve.disagg.transfer.backends.pages import Run
from pdserve.disagg.transfer.base import TransferManager
from pdserve.disagg.transfer.rooms.sender import SessionSender
from pdserve.disagg.transfer.sessions.data_path import IncomingRoom
from pdserve.disagg.transfer.sessions.identity import local_identity
from pdserve.disagg.transfer.sessions.receive import ReceiveSessions, SessionReceiver
from pdserve.disagg.transfer.sessions.send import SendSessions
from pdserve.disagg.transfer.sessions.wire import FrameSocket, SessionClosed


LOST_GRACE_S = 1.0  # after a one-sided write error, how long to wait for the session to drop


def raise_write_error(region: Any, what: str, stop: Callable[[], bool] = lambda: False) -> NoReturn:
    """A one-sided write failed (`what` says how). Most such errors mean the decode is gone, so
    give its session LOST_GRACE_S to confirm (close_region sets `region.closed`); the room then
    fails as "decode connection lost", else with the write error itself."""
    deadline = time.monotonic() + LOST_GRACE_S
    while not region.closed and not stop() and time.monotonic() < deadline:
        time.sleep(0.02)
    if region.closed:
        raise SessionClosed(f"{what}; decode session closed")
    raise RuntimeError(what)


class SessionTransferManager(TransferManager):
    backend_name = "peer"
    one_sided = False  # True: the prefill process writes into decode memory itself

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1", *, port: int = 0,
                 advertise_host: str | None = None) -> None:
        super().__init__(role, k, v, page_size, layout, config, host)
        self.identity = local_identity(host)
        self._prefill: SendSessions | None = None
        self._decode: ReceiveSessions | None = None
        if role == "prefill":
            self._prefill = SendSessions(self, port, advertise_host)
            self.endpoint = self._prefill.endpoint
        else:
            self._decode = ReceiveSessions(self)
            self.endpoint = f"decode:{self.identity.instance}"

    # --- TransferManager ----------------------------------------------------------------------

    def sender(self, room: int) -> SessionSender:
        if self._prefill is None:
            raise RuntimeError("sender() is for the prefill role")
        return self._prefill.sender(room)

    def receiver(self, room: int, prefill_endpoint: str, heads: HeadSlice | None = None,
                 fanout: int = 1) -> SessionReceiver:
        if self._decode is None:
            raise RuntimeError("receiver() is for the decode role")
        return self._decode.receiver(room, prefill_endpoint, heads, fanout)

    def peer_dead(self, endpoint: str, reason: str) -> None:
        if self._decode is not None:
            self._decode.peer_dead(endpoint, reason)

    def close(self) -> None:
        if self._prefill is not None:
            self._prefill.close()
        if self._decode is not None:
            self._decode.close()

    # --- backend hooks ------------------------------------------------------------------------

    def hello_region(self) -> bytes:
        return b""

    def open_region(self, hello: Hello) -> Any:
        return None

    def close_region(self, region: Any) -> None:
        pass

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int:
        """Move the runs' pages (all layers, K and V; only the `heads` slice of each slot when
        given) to decode; returns DataFrames sent."""
        return 0

    def read_frame(self, sock: FrameSocket, frame: DataFrame, receiver: IncomingRoom | None) -> None:
        raise SessionClosed(f"backend {self.backend_name!r} does not send DataFrames")

    def check_done(self, receiver: IncomingRoom, done: Done) -> str | None:
        """A reason to reject a Done, or None."""
        return None
