"""Build the stage of an engine's PD mode: the KV pool's memory, the transfer manager, bootstrap.

null:    NullStage (no transfer machinery at all)
prefill: manager (sender side) + BootstrapServer publishing every rank's endpoint and layout
         (with --dp-size: dp rank 0 hosts it, the other dp ranks register their ranks over HTTP)
decode:  manager (receiver side; for shm its pool lives in shared memory) + BootstrapClient
         (route lookup with the layout check at first contact, heartbeat → manager.peer_dead);
         with decode_enable_radix_cache its stage matches prompts against the engine's prefix cache
The transfer itself is `pdserve.disagg`'s (open_rooms, publish_routes, BootstrapClient): with tensor
parallelism rank 0's rooms wait for the other ranks' agents and span each room over every rank.
An MLA model's latent pool moves as any pool (one tensor, one "head"; the layout says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.disagg import (
    BootstrapClient,
    DisaggConfig,
    KVLayout,
    TPChannel,
    open_rooms,
    publish_routes,
    shared_kv_pool,
)
from pdserve.engine.kv_cache import Pool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.pd.decode import DecodeStage
from pdserve.engine.pd.prefill import PrefillStage
from pdserve.engine.pd.stage import NullStage, Stage
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.stop import StopChecker


def pool_tensors(disagg: DisaggConfig | None, shape: tuple[tuple[int, ...], int], dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """The KV pool's memory for the PD mode (`shape`: kv_cache.pool_shape's, the tensors' shape and
    count): shared memory for a shm decode, else None (its own)."""
    return shared_kv_pool(disagg, shape[0], dtype, device, shape[1])


@dataclass(frozen=True)
class DPPlace:
    """Where an engine sits among its server's data-parallel ranks."""

    rank: int = 0
    size: int = 1


def build_stage(disagg: DisaggConfig | None, layout: KVLayout, pool: Pool, scheduler: Scheduler,
                kv: KVManager, stops: StopChecker, vocab_size: int, peers: TPChannel | None = None,
                dp: DPPlace = DPPlace()) -> Stage:
    if disagg is None or disagg.mode == "null":
        return NullStage(scheduler)
    rooms = open_rooms(disagg, layout, pool.tensors, pool.page_size, peers)  # a latent pool: one tensor
    if disagg.mode == "prefill":
        try:
            server = publish_routes(disagg, rooms.ranks, dp.rank, dp.size)
        except BaseException:
            rooms.close()
            raise
        return PrefillStage(scheduler, pool.page_size, rooms, server)
    try:
        disagg.check_decode_radix_cache(prefix_cache=kv.cache.enabled)
    except ValueError:
        rooms.close()
        raise
    client = BootstrapClient(layout, disagg)
    rooms.watch(client)
    return DecodeStage(scheduler, kv, stops, vocab_size, rooms, client,
                       recompute=disagg.failure_policy == "recompute",
                       prefix_cache=disagg.decode_enable_radix_cache)
