"""Build the stage of an engine's PD mode: the KV pool's memory, the transfer manager, bootstrap.

null:    NullStage (no transfer machinery at all)
prefill: manager (sender side) + BootstrapServer publishing every rank's endpoint and layout
         (with --dp-size: dp rank 0 hosts it, the other dp ranks register their ranks over HTTP)
decode:  manager (receiver side; for shm its pool lives in shared memory) + BootstrapClient
         (route lookup with the layout check at first contact, heartbeat → manager.peer_dead);
         with decode_enable_radix_cache its stage matches prompts against the engine's prefix cache
With tensor parallelism rank 0's manager is one of several: RankedManager (disagg/tp_control.py)
waits for the other ranks' agents and spans each room over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import Store

from pdserve.disagg.bootstrap import BootstrapServer
from pdserve.disagg.bootstrap_client import BootstrapClient, register_route
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout
from pdserve.disagg.tp_control import LocalRooms, RankedManager, RankHub, ServerRooms
from pdserve.disagg.transfer.base import create_manager
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.pd.decode import DecodeStage
from pdserve.engine.pd.prefill import PrefillStage
from pdserve.engine.pd.stage import NullStage, Stage
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.stop import StopChecker


@dataclass(frozen=True)
class TPPeers:
    """What rank 0's stage needs to reach the other tensor-parallel ranks' transfer agents."""

    host: str  # the rendezvous host: rank 0's hub binds there
    num_ranks: int
    store: Store  # the group's rendezvous store: the hub's address goes there


def pool_tensors(disagg: DisaggConfig | None, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K/V tensors in shared memory for a shm decode server (prefill writes into them);
    None: the pool allocates its own."""
    if disagg is None or disagg.mode != "decode" or disagg.backend != "shm":
        return None
    if device.type != "cpu":
        raise ValueError("the shm transfer backend moves host memory: use it with --device cpu")
    from pdserve.disagg.transfer.backends.shm_pool import allocate_shared_pool

    pool = allocate_shared_pool(shape, dtype)
    return pool.k, pool.v


@dataclass(frozen=True)
class DPPlace:
    """Where an engine sits among its server's data-parallel ranks."""

    rank: int = 0
    size: int = 1


REGISTER_WAIT_S = 600.0  # a dp rank > 0 waits this long for dp rank 0's bootstrap server (weights load first)


def _bootstrap(disagg: DisaggConfig, rooms: ServerRooms, dp: DPPlace) -> BootstrapServer | None:
    """Register every rank's route: in-process on dp rank 0 (which hosts the server), over HTTP
    from the other dp ranks."""
    if dp.rank == 0:
        server = BootstrapServer.from_config(disagg).start()
        for rank, (endpoint, rank_layout) in enumerate(rooms.ranks):
            server.register(rank, endpoint, rank_layout, 0, dp.size)
        return server
    for rank, (endpoint, rank_layout) in enumerate(rooms.ranks):
        register_route(disagg.bootstrap_host, disagg.bootstrap_port, rank, endpoint, rank_layout,
                       disagg.cluster_token, dp_rank=dp.rank, dp_size=dp.size, wait_s=REGISTER_WAIT_S)
    return None


def build_stage(disagg: DisaggConfig | None, layout: KVLayout, pool: KVPool, scheduler: Scheduler,
                kv: KVManager, stops: StopChecker, vocab_size: int, peers: TPPeers | None = None,
                dp: DPPlace = DPPlace()) -> Stage:
    if disagg is None or disagg.mode == "null":
        return NullStage(scheduler)
    manager = create_manager(disagg.backend, disagg.mode, pool.k, pool.v, pool.page_size, layout, disagg,
                             host=disagg.bootstrap_host)
    rooms: ServerRooms
    if peers is None:
        rooms = LocalRooms(manager)
    else:
        try:
            rooms = RankedManager(manager, RankHub(peers.host, peers.num_ranks, peers.store.set))
        except BaseException:
            manager.close()
            raise
    if disagg.mode == "prefill":
        try:
            server = _bootstrap(disagg, rooms, dp)
        except BaseException:
            rooms.close()
            raise
        return PrefillStage(scheduler, pool.page_size, rooms, server)
    if disagg.decode_enable_radix_cache and not kv.cache.enabled:
        rooms.close()
        raise ValueError("--disaggregation-decode-enable-radix-cache needs the prefix cache "
                         "(drop --disable-radix-cache)")
    client = BootstrapClient(layout, disagg)
    rooms.watch(client)
    return DecodeStage(scheduler, kv, stops, vocab_size, rooms, client,
                       recompute=disagg.failure_policy == "recompute",
                       prefix_cache=disagg.decode_enable_radix_cache)
