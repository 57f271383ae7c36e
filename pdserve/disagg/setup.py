"""Wire a PD role into an engine: the KV pool's memory, the transfer manager, bootstrap, queues.

prefill: manager (sender side) + BootstrapServer publishing rank 0's endpoint and layout
decode:  manager (receiver side; for shm its pool lives in shared memory) + BootstrapClient
         (route lookup with the layout check at first contact, heartbeat → manager.peer_dead)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.disagg.bootstrap import BootstrapServer
from pdserve.disagg.bootstrap_client import BootstrapClient
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_queues import DecodeQueues
from pdserve.disagg.messages import KVLayout
from pdserve.disagg.prefill_queues import PrefillQueues
from pdserve.disagg.transfer.base import create_manager

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


def pool_tensors(disagg: DisaggConfig, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K/V tensors in shared memory for a shm decode server (prefill writes into them)."""
    if disagg.mode != "decode" or disagg.backend != "shm":
        return None
    if device.type != "cpu":
        raise ValueError("the shm transfer backend moves host memory: use it with --device cpu")
    from pdserve.disagg.transfer.shm_pool import allocate_shared_pool

    pool = allocate_shared_pool(shape, dtype)
    return pool.k, pool.v


def attach_disagg(engine: "Engine", disagg: DisaggConfig) -> PrefillQueues | DecodeQueues:
    pool = engine.pool
    layout = KVLayout.for_pool(engine.model_path.name, pool.k, pool.page_size)
    manager = create_manager(disagg.backend, disagg.mode, pool.k, pool.v, pool.page_size, layout, disagg,
                             host=disagg.bootstrap_host)
    if disagg.mode == "prefill":
        server = BootstrapServer.from_config(disagg).start()
        server.register(0, manager.endpoint, layout)
        return PrefillQueues(engine, manager, server)
    client = BootstrapClient(layout, disagg)
    manager.watch(client)
    return DecodeQueues(engine, manager, client)
