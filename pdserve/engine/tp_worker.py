"""Tensor-parallel ranks 1..tp-1 of one engine: they follow rank 0's scheduler.

Lifecycle:
  rank 0  `TPRanks.start(...)` (from Engine.__init__): a TCPStore on an ephemeral port, then one
          `python -m pdserve.engine.tp_worker SPEC` process per other rank (SPEC: msgspec JSON;
          the process dies with its parent), then joins the group itself.
  rank r  joins the group, loads its weight slices, allocates its KV pool (rank 0's page count,
          its own KV heads) and loops on RankMsg from rank 0:
            StepPlan  -> run it, joining the forward's collectives (the same plan on every rank)
            StopRanks -> leave the group, exit 0
  rank 0  `publish(plan)` before each forward; `close()` sends StopRanks and reaps the processes.
Rank 0 alone schedules and samples (its logits are gathered over the vocabulary); the other
ranks only compute. A rank that dies fails rank 0's next collective (parallel/group.py's
COMPUTE_TIMEOUT at worst), which fails the engine, which takes its server down.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from dataclasses import replace

import msgspec
import torch

from pdserve.engine.config import EngineConfig, default_threads, set_torch_threads
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.messages import RankMsg, StepPlan, StopRanks
from pdserve.engine.runner import ModelRunner
from pdserve.launch.procs import die_with_parent
from pdserve.model.bundled import resolve_model
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.tp import NoCollectives, TPShard
from pdserve.parallel.group import TPGroup, host_store

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


class RankSpec(msgspec.Struct, frozen=True):
    config: EngineConfig  # with num_pages and max_model_len as rank 0 resolved them
    rank: int
    host: str
    port: int


def rank_threads(config: EngineConfig) -> int:
    """torch threads per rank: the flag, else this process's cores shared among the ranks."""
    return config.threads or max(1, default_threads() // config.tp_size)


def resolved_config(config: EngineConfig, cfg: ModelConfig) -> EngineConfig:
    """`config` with num_pages and max_model_len fixed the way every rank must agree on."""
    config.check_parallel()
    if config.num_pages is None and config.mem_fraction_static is not None:
        raise ValueError("--mem-fraction-static with --tp-size > 1 is not supported yet: the ranks must agree on "
                         "the pool size before loading; give --kv-cache-gb or --num-pages")
    local, ps = TPShard(0, config.tp_size).local_config(cfg), config.page_size  # raises on a bad tp
    itemsize = torch.empty((), dtype=resolve_dtype(config.dtype)).element_size()
    num_pages = config.num_pages or KVPool.pages_for_budget(local, ps, config.kv_cache_gb, itemsize)
    max_len = min(config.max_model_len or cfg.max_position_embeddings, (num_pages - 1) * ps)
    return replace(config, num_pages=num_pages, max_model_len=max_len)


def _spawn(config: EngineConfig, ranks: range, host: str, port: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "pdserve.engine.tp_worker",
                              msgspec.json.encode(RankSpec(config, r, host, port)).decode()]) for r in ranks]


def build_rank(config: EngineConfig, shard: TPShard, group: TPGroup | None,
               device: torch.device) -> tuple[LlamaForCausalLM, KVPool, ModelConfig]:
    """This rank's model slice and KV pool (config.num_pages and max_model_len resolved)."""
    assert config.num_pages is not None and config.max_model_len is not None
    path = resolve_model(config.model)
    cfg = ModelConfig.from_folder(path)
    dtype = resolve_dtype(config.dtype)
    model = load_model(path, device, dtype, config.max_model_len + 1, shard, group or NoCollectives())
    pool = KVPool(shard.local_config(cfg), config.num_pages, config.page_size, device, dtype)
    return model, pool, cfg


class TPRanks:
    """Rank 0's handle on the group and the other ranks' processes."""

    def __init__(self, group: TPGroup, procs: list[subprocess.Popen[bytes]]) -> None:
        self.group, self.procs = group, procs

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device) -> TPRanks:
        """Node 0: the store, this node's other ranks, and rank 0's place in the group."""
        host, port = config.rendezvous()
        store = host_store(host, port, config.tp_size)
        procs = _spawn(config, range(1, config.ranks_per_node), host, store.port)
        try:
            group = TPGroup.join(0, config.tp_size, host, store.port, device, store)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        return cls(group, procs)

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


def serve_node(config: EngineConfig) -> int:
    """A node other than 0 (`pdserve serve --node-rank N`): run its ranks until they end."""
    config = resolved_config(config, ModelConfig.from_folder(resolve_model(config.model)))
    host, port = config.rendezvous()
    first = config.node_rank * config.ranks_per_node
    procs = _spawn(config, range(first, first + config.ranks_per_node), host, port)
    log.info("node %d: tp ranks %d..%d joining %s:%d", config.node_rank, first, first + len(procs) - 1, host, port)
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def follow(spec: RankSpec) -> None:
    config = spec.config
    set_torch_threads(rank_threads(config))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", spec.rank % config.ranks_per_node)
        torch.cuda.set_device(device)
    group = TPGroup.join(spec.rank, config.tp_size, spec.host, spec.port, device)
    shard = TPShard(spec.rank, config.tp_size)
    model, pool, _ = build_rank(config, shard, group, device)
    runner = ModelRunner(model, pool, device)
    decoder = msgspec.msgpack.Decoder(RankMsg)
    while True:
        msg = decoder.decode(group.recv_bytes())
        if isinstance(msg, StopRanks):
            break
        runner.run(msg)
    group.close()


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s tp rank: %(message)s")
    follow(msgspec.json.decode(argv[1], type=RankSpec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
