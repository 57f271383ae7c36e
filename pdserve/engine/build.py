"""Build an Engine's parts from its config, in the order they depend on each other.

    device, dtype, torch threads      a DP rank's own device (engine/dp_attention.py)
    model config, tokenizer           from --model / --tokenizer (bundled names resolved)
    TP shard                          a tp / ep size that does not fit fails here, before any weight loads
    dtype, pool size                  engine/memory.py: --dtype auto; the pool from --num-pages /
                                      --kv-cache-gb before the weights load, from the device's
                                      memory after them (tp ranks: before, on the checkpoint's size)
    TP ranks 1..N-1                   their processes start before rank 0 loads (engine/tp_worker.py)
    DP-attention group                the MLP's collectives (parallel/dp_attention.py)
    experts                           EP: all-to-all over the DP-attention ranks, or each tp rank's
                                      share of the same tokens (parallel/ep.py; engine/tp_worker.py)
    model                             the weights, RoPE tables up to the context length
    KV pool, KV manager               the pool's memory comes from the PD mode (shm: shared);
                                      the manager's prefix cache gets its tier (NoTier: none;
                                      --enable-hierarchical-cache: engine/kv_tiers' TieredKVManager)
    scheduler, stats, DP rank, runner, sampler, stop checker, grammars
    speculator                        NoSpeculation: plain decoding (engine/speculate.py), or with
                                      --speculative-algorithm engine/spec/ (its draft model, the
                                      start-up probes of the forward's cost: engine/spec/build.py)
    stage                             the PD mode's stage and transfer machinery (engine/pd/build.py);
                                      `make_stage` builds another for a live role switch (same pool)

`Engine.build(config, disagg)` is `Engine(build_parts(config, disagg))`: the Engine only runs
what it is given, so a test or a new feature can hand it other parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.disagg import DisaggConfig
from pdserve.engine.config import EngineConfig, keep_freed_memory, set_torch_threads
from pdserve.engine.dp_attention import DPAttentionRank, dp_device, join_dp_attention
from pdserve.engine.grammar import Grammars
from pdserve.engine.kv_cache import KVPool, Pool, new_pool, pool_shape
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.memory import NO_MEMORY, activation_bytes, device_memory, memory_based, pool_gib, with_dtype
from pdserve.engine.pd.build import DPPlace, build_stage, pool_tensors
from pdserve.engine.pd.stage import Stage
from pdserve.engine.prefix_cache import NoTier
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.spec.build import build_speculator
from pdserve.engine.speculate import Speculator
from pdserve.engine.stats import EngineStats
from pdserve.engine.stop import StopChecker
from pdserve.engine.tp_worker import (TPRanks, check_model_fits, expert_comm, rank_layout, rank_shard, rank_threads,
                                      resolved_config)
from pdserve.model.bundled import resolve_model
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.tokenizer import Tokenizer
from pdserve.model.tp import Collectives, NoCollectives

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineParts:
    """Everything an Engine runs with (see the module docstring for where each comes from)."""

    config: EngineConfig
    device: torch.device
    model_path: Path
    model_config: ModelConfig
    tokenizer_path: Path
    tokenizer: Tokenizer
    model: LlamaForCausalLM
    load_weights_s: float
    max_model_len: int
    pool: Pool
    kv: KVManager
    scheduler: Scheduler
    stats: EngineStats
    ranks: TPRanks | None  # tensor parallelism: the other ranks of this engine
    dp: DPAttentionRank | None  # DP attention: this rank's side of the per-step round
    runner: ModelRunner
    sampler: Sampler
    eos_ids: frozenset[int]
    stops: StopChecker
    grammars: Grammars
    speculator: Speculator
    stage: Stage
    disagg: DisaggConfig | None  # the PD mode `stage` serves
    make_stage: Callable[[DisaggConfig | None], Stage]  # the stage of a PD mode over this pool (role switch)


def build_kv(config: EngineConfig, pool: Pool, model_name: str, disagg: DisaggConfig | None) -> KVManager:
    """The KV manager: the device pool only (NoTier), or with --enable-hierarchical-cache the
    tiered one (engine/kv_tiers: host memory, storage; a PD decode writes finished requests back)."""
    if not config.hicache.enable:
        return KVManager(pool.num_pages, config.page_size, config.enable_prefix_cache, NoTier())
    from pdserve.engine.kv_tiers.manager import TieredKVManager

    return TieredKVManager.build(config, pool, model_name, decode=disagg is not None and disagg.mode == "decode")


def build_parts(config: EngineConfig, disagg: DisaggConfig | None = None) -> EngineParts:
    device = dp_device(config, resolve_device(config.device))
    model_path = resolve_model(config.model, revision=config.revision, download_dir=config.download_dir)
    config = with_dtype(config, device, model_path)  # "auto" made concrete before anything reads it
    dtype = resolve_dtype(config.dtype)
    set_torch_threads(config.threads)
    cfg = ModelConfig.from_folder(model_path)
    tokenizer_path = resolve_model(config.tokenizer, download_dir=config.download_dir, weights=False) \
        if config.tokenizer else model_path
    tokenizer = Tokenizer(tokenizer_path, config.chat_template)
    ps = config.page_size
    par = config.parallel
    check_model_fits(par, cfg)  # a tp / ep size that does not fit fails here, before any weight loads
    shard = rank_shard(par, par.dp_rank if par.enable_dp_attention else 0)
    local = shard.local_config(cfg)
    wanted_len = config.max_model_len or cfg.max_position_embeddings
    log.info("loading weights of %s (%d layers, hidden %d) on %s in %s", model_path.name,
             cfg.num_hidden_layers, cfg.hidden_size, device, config.dtype)
    ranks: TPRanks | None = None
    if par.num_processes > 1:
        set_torch_threads(rank_threads(config))
    if par.attn_tp_size > 1:  # the ranks agree on the pool before loading (engine/memory.py)
        config = resolved_config(config, cfg, model_path, device)
        ranks = TPRanks.start(config, device, disagg)
    # the pool's size is known before the weights load unless memory decides it (engine/memory.py):
    # then RoPE tables cover the model's length
    sized_by_memory = memory_based(config, device)
    num_pages = config.num_pages or (None if sized_by_memory else
                                     KVPool.pages_for_budget(local, ps, pool_gib(config, device, NO_MEMORY, 0, 0),
                                                             dtype.itemsize))
    dp_group = join_dp_attention(config, device)  # DP attention: the MLP's group
    comm: Collectives = dp_group or (ranks.group if ranks is not None else NoCollectives())
    t0 = time.perf_counter()
    rope_len = min(wanted_len, (num_pages - 1) * ps) if num_pages else wanted_len
    model = load_model(model_path, device, dtype, rope_len + 1, shard, comm, config.cpu_prepack,
                       expert_comm(shard, dp_group), config.quantization)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    load_weights_s = time.perf_counter() - t0
    log.info("weights loaded in %.1f s (%.2f GB)", load_weights_s, weights / 2**30)
    if num_pages is None:
        gib = pool_gib(config, device, device_memory(device), weights, activation_bytes(cfg, config, dtype.itemsize))
        num_pages = KVPool.pages_for_budget(local, ps, gib, dtype.itemsize)
    max_model_len = min(wanted_len, (num_pages - 1) * ps)
    tensors = pool_tensors(disagg, pool_shape(local, num_pages, ps), dtype, device)
    pool = new_pool(local, num_pages, ps, device, dtype, tensors)
    log.info("KV pool: %d pages of %d tokens = %d tokens, %.2f GB; context length %d", num_pages, ps,
             num_pages * ps, num_pages * pool.page_bytes() / 2**30, max_model_len)
    kv = build_kv(config, pool, model_path.name, disagg)
    scheduler = Scheduler(kv, config.chunk_budget, config.max_running, config.decode_headroom,
                          config.enable_priority_scheduling)
    keep_freed_memory()  # after the weights and the pool: they keep their own mappings
    stats = EngineStats(config.log_stats_interval_s)
    dp = DPAttentionRank(dp_group, model, stats) if dp_group is not None else None
    publish = ranks.publish if ranks is not None else dp.before_forward if dp else None
    eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(cfg.eos_token_id)
    stops = StopChecker(tokenizer, eos_ids, max_model_len)
    layout = rank_layout(model_path.name, pool, shard, cfg)

    def make_stage(mode: DisaggConfig | None) -> Stage:
        return build_stage(mode, layout, pool, scheduler, kv, stops, cfg.vocab_size,
                           ranks.peers(config) if ranks is not None else None, DPPlace(par.dp_rank, par.dp_size))

    stage = make_stage(disagg)
    runner = ModelRunner(model, pool, device, publish, config.attention_backend)
    grammars = Grammars(tokenizer.hf, cfg.vocab_size, eos_ids)
    speculator = build_speculator(config.speculative, disagg.mode if disagg is not None else "null", kv, runner, cfg,
                                  stops, grammars, config.chunk_budget, max_model_len, probe=dp is None, dtype=dtype,
                                  cpu_prepack=config.cpu_prepack)
    return EngineParts(
        config=config, device=device, model_path=model_path, model_config=cfg, tokenizer_path=tokenizer_path,
        tokenizer=tokenizer, model=model, load_weights_s=load_weights_s, max_model_len=max_model_len, pool=pool,
        kv=kv, scheduler=scheduler, stats=stats, ranks=ranks, dp=dp, runner=runner,
        sampler=Sampler(cfg.vocab_size, device), eos_ids=eos_ids, stops=stops,
        grammars=grammars, speculator=speculator, stage=stage, disagg=disagg, make_stage=make_stage)
