"""A PD server's rooms: the transfer of one server (every tensor-parallel rank) behind one face.

Lifecycle (what the engine's PD build does, per server; engine/pd/build.py):

    tensors = shared_kv_pool(config, shape, dtype, device, count) or the pool's own   # shm decode
    rooms = open_rooms(config, layout, tensors, page_size, tp)    # rank 0: the mode's backend manager,
                                                                  # with TP one over every rank
    rank r > 0:  agent = join_rooms(config, layout, tensors, page_size, rank, lookup)
    (tensors: (K, V), or an MLA latent pool's one tensor: layout.tensors says which)
    prefill:     server = publish_routes(config, rooms.ranks, dp_rank, dp_size)   (bootstrap.py)
                 s = rooms.sender(room)
    decode:      client = BootstrapClient(layout, config); rooms.watch(client)
                 r = rooms.open(room, client.routes(host, port, room))
    rooms.close()  (with TP: stops every rank's agent, then rank 0's manager)

One rank: LocalRooms (its manager; links from every prefill rank into its pool). Several ranks:
RankedManager (transfer/tp/ranked.py) drives the other ranks' agents over rank 0's hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.disagg.bootstrap_client import BootstrapClient
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout
from pdserve.disagg.transfer.base import KVReceiver, KVSender, TransferManager, create_manager
from pdserve.disagg.transfer.rooms.all_of import link_receiver
from pdserve.disagg.transfer.tp.agent import RankAgent
from pdserve.disagg.transfer.tp.hub import RankHub
from pdserve.disagg.transfer.tp.links import HeadRange, decode_links, head_range
from pdserve.disagg.transfer.tp.messages import STORE_KEY
from pdserve.disagg.transfer.tp.ranked import RankedManager


class ServerRooms(Protocol):
    """What a server's PD stage opens rooms with: its transfer manager(s) behind one face."""

    layout: KVLayout  # rank 0's pool

    @property
    def ranks(self) -> list[tuple[str, KVLayout]]:
        """(transfer endpoint, layout) of each rank, in rank order."""
        ...

    def sender(self, room: int) -> KVSender: ...

    def open(self, room: int, sources: list[tuple[str, HeadRange]]) -> KVReceiver:
        """A decode room fed by the prefill ranks in `sources` (endpoint, heads), in rank order."""
        ...

    def watch(self, client: BootstrapClient) -> None: ...

    def close(self) -> None: ...


class LocalRooms:
    """A server of one rank: its manager, links from every prefill rank into its pool."""

    def __init__(self, manager: TransferManager) -> None:
        self.manager, self.layout = manager, manager.layout

    @property
    def ranks(self) -> list[tuple[str, KVLayout]]:
        return [(self.manager.endpoint, self.layout)]

    def sender(self, room: int) -> KVSender:
        return self.manager.sender(room)

    def open(self, room: int, sources: list[tuple[str, HeadRange]]) -> KVReceiver:
        links = decode_links(sources, [head_range(self.layout)], self.layout.all_kv_heads)
        return link_receiver(self.manager, room, links[0])

    def watch(self, client: BootstrapClient) -> None:
        self.manager.watch(client)

    def close(self) -> None:
        self.manager.close()


@dataclass(frozen=True)
class TPChannel:
    """Where rank 0 of a tensor-parallel server meets its other ranks' transfer agents."""

    host: str  # the rendezvous host: rank 0's hub binds there
    num_ranks: int
    publish: Callable[[str, str], object]  # the TP group's store: (key, value), the hub's address


PoolTensors = tuple[torch.Tensor, ...]  # a pool's memory: K and V, or one latent


def _manager(config: DisaggConfig, layout: KVLayout, tensors: PoolTensors, page_size: int) -> TransferManager:
    if len(tensors) != layout.tensors:
        raise ValueError(f"the layout has {layout.tensors} pool tensors, {len(tensors)} given")
    v = tensors[1] if len(tensors) > 1 else None
    return create_manager(config.backend, config.mode, tensors[0], v, page_size, layout, config,
                          host=config.bootstrap_host)


def open_rooms(config: DisaggConfig, layout: KVLayout, tensors: PoolTensors, page_size: int,
               tp: TPChannel | None = None) -> ServerRooms:
    """Rank 0's rooms for the config's mode and backend; with `tp`, spanning every rank (waits for
    the other ranks' agents to say hello). Raises BackendUnavailable / ValueError / TimeoutError."""
    manager = _manager(config, layout, tensors, page_size)
    if tp is None:
        return LocalRooms(manager)
    try:
        return RankedManager(manager, RankHub(tp.host, tp.num_ranks, tp.publish))
    except BaseException:
        manager.close()
        raise


def join_rooms(config: DisaggConfig, layout: KVLayout, tensors: PoolTensors, page_size: int,
               rank: int, lookup: Callable[[str], bytes]) -> RankAgent:
    """Rank r's part of its server's rooms: a manager over its own pool, driven by rank 0's hub
    (whose address `lookup` reads from the TP group's store). `agent.join()` after rank 0 stopped it."""
    manager = _manager(config, layout, tensors, page_size)
    try:
        return RankAgent(rank, manager, lookup(STORE_KEY).decode())
    except BaseException:
        manager.close()
        raise


def shared_kv_pool(config: DisaggConfig | None, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device, count: int = 2) -> PoolTensors | None:
    """The pool's `count` tensors (K and V, or a latent) in shared memory for a shm decode server
    (prefill writes straight into them); None: the engine's pool allocates its own."""
    if config is None or config.mode != "decode" or config.backend != "shm":
        return None
    if device.type != "cpu":
        raise ValueError("the shm transfer backend moves host memory: use it with --device cpu")
    from pdserve.disagg.transfer.backends.shm_pool import allocate_shared_pool

    pool = allocate_shared_pool(shape, dtype, tensors=count)
    return (pool.k,) if pool.v is None else (pool.k, pool.v)
