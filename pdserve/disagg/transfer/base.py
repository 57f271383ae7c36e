"""The transfer-backend interface every backend implements (tcp, shm, fake, nixl, mooncake).

Lifecycle, per rank and per room:

    prefill rank                                      decode rank
    mgr = create_manager(backend, "prefill", k, v..)  mgr = create_manager(backend, "decode", k, v..)
                                        (v None: a pool of one tensor, an MLA latent; layout.tensors 1)
    bootstrap.register(rank, mgr.endpoint, layout)    route = client.get_route(host, port, rank)
                                                      mgr.watch(client)   # heartbeat -> peer_dead
    s = mgr.sender(room)          Bootstrapping       r = mgr.receiver(room, route.endpoint)
                                                      r.init(dst_pages, decode_prefix_len)
                                                                          # RoomInfo -> prefill
    s.poll() -> WaitingForInput   (RoomInfo arrived)
    s.send(pages, start, False)   Transferring        r.poll() -> WaitingForInput / Transferring
    s.send(pages, start, True, metadata)
    s.poll() -> Success           (decode acked)      r.poll() -> Success; r.metadata()
    mgr.close()                                       mgr.close()

State per room: Failed < Bootstrapping < WaitingForInput < Transferring < Success. It only moves
forward, except Failed, which always wins (`advance`). A terminal state (Success/Failed) is
reported by poll() only when no write of the room can land any more, and it sticks once reported.

Decode-side prefix cache: a decode that already holds the prompt's first `decode_prefix_len`
tokens (whole pages) reserves and names only the pages past them. The prefill still pushes its
pages in prompt order, `send(src_pages, start_page)` with `start_page` a page index of the prompt;
the sender drops every page below `decode_prefix_len // page_size` and shifts the rest onto the
decode's list, so no backend (tcp, shm, nixl, mooncake, fake) and no head slice sees the prefix:

    prompt pages   0  1  2 | 3  4        decode_prefix_len = 3 * page_size
    dst_pages              | d0 d1       send([s0, s1], 0) -> nothing moves (not last)
                                         send([s2, s3, s4], 2, last) -> s3->d0, s4->d1, Done
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

import torch

from pdserve.disagg.backends import BACKENDS
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import HeadSlice, KVLayout, MetadataRecord

if TYPE_CHECKING:
    from pdserve.disagg.bootstrap_client import BootstrapClient, PrefillAddr

ROLES = ("prefill", "decode")


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


TERMINAL = (KVPoll.Failed, KVPoll.Success)


def advance(current: KVPoll, new: KVPoll) -> KVPoll:
    """The room state machine: forward only (max), except Failed, which always wins."""
    return KVPoll.Failed if new == KVPoll.Failed else KVPoll(max(current, new))


class BackendUnavailable(ImportError):
    """An optional backend's package is not installed; the message says what to install."""


class KVSender(ABC):
    """Prefill side of one room. All methods are non-blocking (except `wait`)."""

    room: int

    @property
    @abstractmethod
    def num_dst_pages(self) -> int | None:
        """Pages decode reserved for this room (past its cached prefix); None until its RoomInfo arrived."""

    @property
    @abstractmethod
    def decode_prefix_len(self) -> int | None:
        """Prompt tokens decode already holds (a multiple of page_size, 0: none); None until its
        RoomInfo arrived. Pages below it are never sent."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def send(self, src_pages: list[int], start_page: int, is_last: bool,
             metadata: MetadataRecord | None = None) -> None:
        """Queue prompt pages [start_page, start_page + len(src_pages)) -> decode's pages: those
        below decode_prefix_len are dropped, page i goes to dst_pages[i - prefix pages];
        `metadata` is required with is_last (and only then; it is sent even when no page is)."""

    @abstractmethod
    def abort(self) -> None: ...

    @property
    @abstractmethod
    def failure(self) -> str | None:
        """Why the room failed (for the client's error), or None."""

    def wait(self, timeout: float, until: KVPoll | None = None) -> KVPoll:
        """Block until a terminal state (or `until` reached), at most `timeout` seconds.
        For tests and tools only: the engine polls and must never call this on its loop."""
        return _wait(self.poll, timeout, until, self._wait_change)

    def _wait_change(self, timeout: float, seen: KVPoll) -> None:
        """Backends may block here until the state moves on (default: sleep)."""
        time.sleep(timeout)


class KVReceiver(ABC):
    """Decode side of one room. All methods are non-blocking (except `wait`)."""

    room: int

    @abstractmethod
    def init(self, dst_pages: list[int], decode_prefix_len: int = 0) -> None:
        """Tell the prefill rank (room, dst_pages, my identity); the clock of waiting_timeout starts.
        `decode_prefix_len`: prompt tokens this decode already holds (whole pages); `dst_pages`
        are the prompt's pages past them."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def metadata(self) -> MetadataRecord | None:
        """The record sent with the last chunk, after Success (check record.room == room)."""

    @abstractmethod
    def abort(self) -> None: ...

    @property
    @abstractmethod
    def failure(self) -> str | None: ...

    def wait(self, timeout: float, until: KVPoll | None = None) -> KVPoll:
        """As KVSender.wait: tests and tools only."""
        return _wait(self.poll, timeout, until, self._wait_change)

    def _wait_change(self, timeout: float, seen: KVPoll) -> None:
        time.sleep(timeout)


class TransferManager(ABC):
    """One per rank: registers the KV pool memory once, owns the backend's threads and sockets."""

    endpoint: str  # what the peer needs; the prefill publishes it through the bootstrap server

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1") -> None:
        if role not in ROLES:
            raise ValueError(f"transfer role must be one of {ROLES}, got {role!r}")
        if layout.page_size != page_size:
            raise ValueError(f"layout page_size {layout.page_size} != page_size {page_size}")
        layout.check_pool(k, v)
        self.role = role
        self.k = k
        self.v = v  # None: a one-tensor pool (an MLA latent: layout.tensors == 1)
        self.tensors = (k,) if v is None else (k, v)
        self.page_size = page_size
        self.num_pages = k.shape[1] // page_size
        self.layout = layout
        self.config = config
        self.host = host

    @abstractmethod
    def sender(self, room: int) -> KVSender: ...

    @abstractmethod
    def receiver(self, room: int, prefill_endpoint: str, heads: HeadSlice | None = None,
                 fanout: int = 1) -> KVReceiver:
        """`heads`/`fanout`: this rank's link from that prefill rank (tp/links.py); None/1 without TP."""

    @abstractmethod
    def peer_dead(self, endpoint: str, reason: str) -> None:
        """Decode: the prefill at `endpoint` is gone; fail its rooms (as soon as no write can land)."""

    @abstractmethod
    def close(self) -> None: ...

    def watch(self, client: BootstrapClient) -> None:
        """Decode: fail rooms of a prefill that the client's heartbeat declares dead."""
        def on_dead(addr: PrefillAddr, endpoints: list[str], reason: str) -> None:
            for endpoint in endpoints:
                self.peer_dead(endpoint, f"prefill {addr.host}:{addr.port} {reason}")

        client.add_dead_callback(on_dead)

    def __enter__(self) -> TransferManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_manager(backend: str, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int,
                   layout: KVLayout, config: DisaggConfig, host: str = "127.0.0.1",
                   **kwargs: object) -> TransferManager:
    """Build the backend's manager; a missing optional backend raises BackendUnavailable (one line)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r}; choose one of {sorted(BACKENDS)}")
    entry = BACKENDS[backend]
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as exc:
        if exc.name == entry.module:
            raise BackendUnavailable(f"transfer backend {backend!r} is not implemented in this pdserve build") from None
        raise BackendUnavailable(f"transfer backend {backend!r} needs the {exc.name!r} package: "
                                 f"{entry.install or 'pip install ' + str(exc.name)}") from None
    cls: type[TransferManager] = getattr(module, entry.cls)
    return cls(role, k, v, page_size, layout, config, host, **kwargs)


def _wait(poll: Callable[[], KVPoll], timeout: float, until: KVPoll | None,
          wait_change: Callable[[float, KVPoll], None]) -> KVPoll:
    deadline = time.monotonic() + timeout
    while True:
        state = poll()
        if state in TERMINAL or (until is not None and state >= until):
            return state
        left = deadline - time.monotonic()
        if left <= 0:
            return state
        wait_change(min(0.05, left), state)  # re-poll at least every 50 ms (timeouts, liveness)
