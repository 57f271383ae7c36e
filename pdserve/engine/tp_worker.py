"""Tensor-parallel ranks 1..tp-1 of one engine: they follow rank 0's scheduler.

Lifecycle:
  rank 0  `TPRanks.start(...)` (from engine/build.py): a TCPStore on an ephemeral port, then one
          `python -m pdserve.engine.tp_worker` process per other rank (its RankSpec, msgspec JSON,
          on stdin, so no secret shows in argv; the process dies with its parent), then joins the
          group itself.
  rank r  joins the group, loads its weight slices (under EP its whole experts: parallel/ep.py's
          EPShare), allocates its KV pool (rank 0's page count, its own KV heads; MLA: the whole
          latent); in a PD server it also starts its transfer manager and the agent that
          runs rank 0's transfer commands on it (pdserve.disagg.join_rooms); then it loops on RankMsg
          from rank 0:
            StepPlan  -> run it, joining the forward's collectives (the same plan on every rank)
            StopRanks -> leave the group, exit 0
  rank 0  `publish(plan)` before each forward; `close()` sends StopRanks and reaps the processes.
Rank 0 alone schedules and samples (its logits are gathered over the vocabulary); the other
ranks only compute. A rank that dies fails rank 0's next step (`check_alive`, this node's ranks)
or its next collective (parallel/group.py's COMPUTE_TIMEOUT at worst, other nodes' ranks), which
fails the engine, which takes its server down.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from dataclasses import replace
from pathlib import Path

import msgspec
import torch

from pdserve.disagg import DisaggConfig, KVLayout, TPChannel, join_rooms
from pdserve.engine.config import EngineConfig, ParallelConfig, default_threads, keep_freed_memory, set_torch_threads
from pdserve.engine.kv_cache import KVPool, Pool, new_pool, pool_shape
from pdserve.engine.memory import planned_pool_gib, with_dtype
from pdserve.engine.messages import RankMsg, StepPlan, StopRanks
from pdserve.engine.pd.build import pool_tensors
from pdserve.engine.runner import ModelRunner
from pdserve.flags.procs import die_with_parent
from pdserve.model.bundled import resolve_model
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.moe import ExpertComm
from pdserve.model.tp import NoCollectives, TPShard
from pdserve.parallel.dp_attention import DPAttentionGroup
from pdserve.parallel.ep import EPShare
from pdserve.parallel.group import TPGroup, host_store

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


class RankSpec(msgspec.Struct, frozen=True):
    config: EngineConfig  # with num_pages and max_model_len as rank 0 resolved them
    rank: int
    host: str
    port: int
    disagg: DisaggConfig | None = None  # a PD server: each rank transfers its own KV heads


def rank_threads(config: EngineConfig) -> int:
    """torch threads per rank: the flag, else this machine's cores shared among the server's
    engine processes (tp ranks of every dp rank)."""
    return config.threads or max(1, default_threads() // config.parallel.num_processes)


def rank_shard(par: ParallelConfig, rank: int) -> TPShard:
    """What rank `rank` (a tp rank, or under DP attention the dp rank) holds of the model."""
    return TPShard(rank, par.tp_size, dp_attention=par.enable_dp_attention, expert_parallel=par.ep_ranks > 1)


def check_model_fits(par: ParallelConfig, cfg: ModelConfig) -> None:
    """Raise ValueError (one sentence) for a layout the model cannot run with, before any weight loads."""
    if par.ep_ranks > 1 and cfg.moe is None:
        raise ValueError(f"--ep-size {par.ep_ranks}: {cfg.architecture} has no experts (expert parallelism is for "
                         "mixture-of-experts models)")
    rank_shard(par, 0).local_config(cfg)  # a tp / dp-attention size that does not fit raises here


def expert_comm(shard: TPShard, dp_group: DPAttentionGroup | None = None) -> ExpertComm | None:
    """Where this rank's routed experts are reached: all-to-all over the DP-attention ranks, or
    each tp rank's share of the same tokens (parallel/ep.py); None without EP."""
    if not shard.expert_parallel:
        return None
    return dp_group.experts() if dp_group is not None else EPShare(shard.rank, shard.size)


def resolved_config(config: EngineConfig, cfg: ModelConfig, folder: Path, device: torch.device) -> EngineConfig:
    """`config` with dtype, num_pages and max_model_len fixed the way every rank must agree on
    (a memory-based pool is planned before loading: engine/memory.py)."""
    config.check_parallel()
    check_model_fits(config.parallel, cfg)
    local, ps = rank_shard(config.parallel, 0).local_config(cfg), config.page_size
    config = with_dtype(config, device, folder)
    itemsize = torch.empty((), dtype=resolve_dtype(config.dtype)).element_size()
    num_pages = config.num_pages or KVPool.pages_for_budget(local, ps, planned_pool_gib(config, device, cfg, folder),
                                                            itemsize)
    max_len = min(config.max_model_len or cfg.max_position_embeddings, (num_pages - 1) * ps)
    return replace(config, num_pages=num_pages, max_model_len=max_len)


def _spawn(config: EngineConfig, ranks: range, host: str, port: int,
           disagg: DisaggConfig | None) -> list[subprocess.Popen[bytes]]:
    procs = []
    for r in ranks:
        p = subprocess.Popen([sys.executable, "-m", "pdserve.engine.tp_worker"], stdin=subprocess.PIPE)
        assert p.stdin is not None
        p.stdin.write(msgspec.json.encode(RankSpec(config, r, host, port, disagg)))
        p.stdin.close()
        procs.append(p)
    return procs


def build_rank(config: EngineConfig, shard: TPShard, group: TPGroup | None, device: torch.device,
               disagg: DisaggConfig | None = None) -> tuple[LlamaForCausalLM, Pool, ModelConfig]:
    """This rank's model slice and KV pool (config.num_pages and max_model_len resolved)."""
    assert config.num_pages is not None and config.max_model_len is not None
    path = resolve_model(config.model, revision=config.revision, download_dir=config.download_dir)
    cfg = ModelConfig.from_folder(path)
    dtype = resolve_dtype(config.dtype)
    model = load_model(path, device, dtype, config.max_model_len + 1, shard, group or NoCollectives(),
                       config.cpu_prepack, expert_comm(shard), config.quantization)
    local = shard.local_config(cfg)
    shape = pool_shape(local, config.num_pages, config.page_size)
    tensors = pool_tensors(disagg, shape, dtype, device)
    pool = new_pool(local, config.num_pages, config.page_size, device, dtype, tensors)
    return model, pool, cfg


def rank_layout(model_name: str, pool: Pool, shard: TPShard, cfg: ModelConfig) -> KVLayout:
    """The layout a rank's transfer manager announces: its pool and which heads it holds (an MLA
    latent: the one "head", every rank all of it)."""
    total = 1 if cfg.mla is not None else cfg.num_key_value_heads
    return KVLayout.for_pool(model_name, pool.tensors[0], pool.page_size, shard.kv_heads(cfg)[0], total,
                             len(pool.tensors))


class TPRanks:
    """Rank 0's handle on the group and the other ranks' processes."""

    def __init__(self, group: TPGroup, procs: list[subprocess.Popen[bytes]]) -> None:
        self.group, self.procs = group, procs

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device, disagg: DisaggConfig | None = None) -> TPRanks:
        """Node 0: the store, this node's other ranks, and rank 0's place in the group."""
        par = config.parallel
        host, port = par.rendezvous()
        store = host_store(host, port, par.tp_size)
        procs = _spawn(config, range(1, par.ranks_per_node), host, store.port, disagg)
        try:
            group = TPGroup.join(0, par.tp_size, host, store.port, device, store)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        return cls(group, procs)

    def peers(self, config: EngineConfig) -> TPChannel:
        """What rank 0's PD stage needs to reach the other ranks' transfer agents."""
        return TPChannel(config.parallel.rendezvous()[0], config.parallel.tp_size, self.group.store.set)

    def check_alive(self) -> None:
        """Raise if one of this node's other ranks has exited: the engine fails, and its server
        goes down, at once rather than at the next collective (a PD server may wait on transfers
        for a long time without a forward). Ranks on other nodes fail the next collective."""
        for i, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {i} exited with code {p.returncode}")

    def publish(self, plan: StepPlan) -> None:
        self.group.send_bytes(msgspec.msgpack.encode(plan))

    def close(self) -> None:
        try:
            self.group.send_bytes(msgspec.msgpack.encode(StopRanks()))
        except RuntimeError:
            pass  # a rank is already gone
        for p in self.procs:
            try:
                p.wait(JOIN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.group.close()


def serve_node(config: EngineConfig, disagg: DisaggConfig | None = None) -> int:
    """A node other than 0 (`pdserve serve --node-rank N`): run its ranks until they end."""
    path = resolve_model(config.model, revision=config.revision, download_dir=config.download_dir)
    config = resolved_config(config, ModelConfig.from_folder(path), path, resolve_device(config.device))
    par = config.parallel
    host, port = par.rendezvous()
    first = par.node_rank * par.ranks_per_node
    procs = _spawn(config, range(first, first + par.ranks_per_node), host, port, disagg)
    log.info("node %d: tp ranks %d..%d joining %s:%d", par.node_rank, first, first + len(procs) - 1, host, port)
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def follow(spec: RankSpec) -> None:
    config, par = spec.config, spec.config.parallel
    set_torch_threads(rank_threads(config))
    device = resolve_device(config.device)
    if device.type == "cuda":
        first = par.dp_rank * par.tp_size  # a dp replica's tp ranks take the GPUs after the previous replica's
        device = torch.device("cuda", (first + spec.rank % par.ranks_per_node) % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    group = TPGroup.join(spec.rank, par.tp_size, spec.host, spec.port, device)
    shard = rank_shard(par, spec.rank)
    disagg = spec.disagg if spec.disagg is not None and spec.disagg.mode != "null" else None
    model, pool, cfg = build_rank(config, shard, group, device, disagg)
    keep_freed_memory()
    agent = None
    if disagg is not None:
        layout = rank_layout(resolve_model(config.model, revision=config.revision,
                                           download_dir=config.download_dir).name, pool, shard, cfg)
        agent = join_rooms(disagg, layout, pool.tensors, pool.page_size, spec.rank, group.store.get)
    runner = ModelRunner(model, pool, device, attention_backend=config.attention_backend)
    decoder = msgspec.msgpack.Decoder(RankMsg)
    while True:
        msg = decoder.decode(group.recv_bytes())
        if isinstance(msg, StopRanks):
            break
        runner.run(msg)
    if agent is not None:
        agent.join(JOIN_TIMEOUT_S)  # rank 0 stops the agents before the ranks
    group.close()


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s tp rank: %(message)s")
    follow(msgspec.json.decode(sys.stdin.buffer.read(), type=RankSpec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
