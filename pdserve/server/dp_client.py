"""The front's data-parallel controller: D engine processes (one EngineClient each) behind the
one interface the routes use (`EngineClient`'s).

Lifecycle (`--dp-size D`):
  1. `start()`: one EngineClient per dp rank, all started at once (each spawns its engine
     process with `dp_rank` set; under --enable-dp-attention they meet at a FileStore in a
     private temp dir and form one group: parallel/dp_attention.py); ready when all are;
  2. `generate(req)`: place the request on one rank (`place`), then it is that rank's stream
     (under DP attention the other ranks get a WakeReq: idle ranks nap until one comes);
  3. control calls fan out: `get_load` answers every rank's LoadInfo (summed for the server's
     figures, each rank's kept for /get_load and /metrics), `flush_cache` flushes every rank;
  4. any rank's engine dying is the server's death: `on_dead` (503 to everyone, the front
     exits non-zero), exactly as with one engine; `close()` stops them all.

Placement, first rule that applies:
  a PD prefill      rank contract.prefill_dp_rank(room, D) (SGLang's room % D: the decode fetches
                    the room's KV from that rank, so the request's data_parallel_rank cannot move it)
  data_parallel_rank  that rank (SGLang's request field; 0 <= rank < D checked by the routes)
  share_prompt_with the rank of the first copy of the prompt (n > 1 copies share its pages)
  otherwise         --load-balance-method: round_robin, or shortest_queue (fewest requests in
                    flight, ties to the lowest rank)
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import operator
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import msgspec

from pdserve.contract import prefill_dp_rank
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig
from pdserve.engine.messages import (EngineReady, ExpertLoad, GenerateReq, LoadBrief, LoadInfo, LoadResp, SpecStats,
                                      TokenOut, TransferStats)
from pdserve.server.engine_client import EngineClient


def merge_loads(loads: list[LoadInfo]) -> LoadInfo:
    """The server's figures from its ranks': counts and rates summed, the hit rate weighted."""
    transfers = [x.transfer for x in loads if x.transfer is not None]
    transfer = None
    if transfers:
        transfer = TransferStats(success=sum(t.success for t in transfers), failed=sum(t.failed for t in transfers),
                                 bytes=sum(t.bytes for t in transfers),
                                 latency_sum_s=sum(t.latency_sum_s for t in transfers),
                                 recomputed=sum(t.recomputed for t in transfers))
    queries = sum(x.cache_queries for x in loads)
    first = loads[0]
    return LoadInfo(
        num_running=sum(x.num_running for x in loads), num_waiting=sum(x.num_waiting for x in loads),
        num_pages=sum(x.num_pages for x in loads), free_pages=sum(x.free_pages for x in loads),
        cached_pages=sum(x.cached_pages for x in loads), evictable_pages=sum(x.evictable_pages for x in loads),
        page_size=first.page_size, transfer=transfer,
        gen_throughput=sum(x.gen_throughput for x in loads), prompt_throughput=sum(x.prompt_throughput for x in loads),
        cache_hit_rate=sum(x.cache_hits for x in loads) / queries if queries else first.cache_hit_rate,
        num_preemptions=sum(x.num_preemptions for x in loads),
        prompt_tokens_computed=sum(x.prompt_tokens_computed for x in loads),
        cache_queries=queries, cache_hits=sum(x.cache_hits for x in loads),
        steps=sum(x.steps for x in loads), step_seconds=sum(x.step_seconds for x in loads),
        idle_steps=sum(x.idle_steps for x in loads), experts=_sum_experts(loads),
        spec=SpecStats.total([x.spec for x in loads if x.spec is not None]))


def _sum_experts(loads: list[LoadInfo]) -> ExpertLoad | None:
    """The ranks' routing counts summed (each counted only its own tokens)."""
    parts = [x.experts for x in loads if x.experts is not None]
    return functools.reduce(operator.add, parts) if parts else None


class DPLoadResp(msgspec.Struct, frozen=True):
    """`get_load`'s answer with dp ranks: the merged figures and each rank's."""

    load: LoadInfo
    ranks: list[LoadInfo]
    integrity_errors: int = 0


class DPEngineClient:
    def __init__(self, config: EngineConfig, start_timeout_s: float = 900.0,
                 on_dead: Callable[[str], None] | None = None, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        self.disagg = disagg or DisaggConfig()
        self._tmpdir = tempfile.mkdtemp(prefix="pdserve-dp-")
        layout = config.parallel
        store = f"{self._tmpdir}/rendezvous" if layout.enable_dp_attention else None
        self.ranks = [EngineClient(replace(config, parallel=replace(layout, dp_rank=d, dp_store=store)),
                                   start_timeout_s, on_dead, self.disagg) for d in range(layout.dp_size)]
        self._next = itertools.count()
        self.info: EngineReady | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    async def start(self) -> EngineReady:
        tasks = [asyncio.ensure_future(c.start()) for c in self.ranks]
        try:
            infos = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close(5.0)
            raise
        first = infos[0]
        self.info = msgspec.structs.replace(first, num_pages=sum(i.num_pages for i in infos),
                                            max_running=sum(i.max_running for i in infos))
        return self.info

    async def close(self, timeout_s: float = 10.0) -> None:
        await asyncio.gather(*(c.close(timeout_s) for c in self.ranks), return_exceptions=True)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ---------------------------------------------------------------- placement
    def place(self, req: GenerateReq) -> int:
        if self.disagg.mode == "prefill" and req.bootstrap is not None:
            return prefill_dp_rank(req.bootstrap.room, self.size)
        if req.data_parallel_rank is not None:
            return req.data_parallel_rank
        if req.share_prompt_with is not None:
            for d, c in enumerate(self.ranks):
                if c.has(req.share_prompt_with):
                    return d
        if self.config.parallel.load_balance_method == "shortest_queue":
            return min(range(self.size), key=lambda d: self.ranks[d].num_in_flight)
        return next(self._next) % self.size

    def generate(self, req: GenerateReq) -> AsyncIterator[TokenOut]:
        rank = self.place(req)
        if self.config.parallel.enable_dp_attention:  # the others nap while idle: its rounds need them now
            for d, c in enumerate(self.ranks):
                if d != rank:
                    c.wake()
        return self.ranks[rank].generate(req)

    # ---------------------------------------------------------------- the EngineClient interface
    @property
    def alive(self) -> bool:
        return all(c.alive for c in self.ranks)

    @property
    def closing(self) -> bool:
        return any(c.closing for c in self.ranks)

    @property
    def dead_reason(self) -> str | None:
        return next((f"dp rank {d}: {c.dead_reason}" for d, c in enumerate(self.ranks) if c.dead_reason), None)

    @property
    def num_in_flight(self) -> int:
        return sum(c.num_in_flight for c in self.ranks)

    def in_flight(self) -> list[str]:
        return [rid for c in self.ranks for rid in c.in_flight()]

    def has(self, rid: str) -> bool:
        return any(c.has(rid) for c in self.ranks)

    def abort(self, rid: str) -> list[str]:
        return [r for c in self.ranks for r in c.abort(rid)]

    def abort_all(self, reason: str = "aborted") -> None:
        for c in self.ranks:
            c.abort_all(reason)

    @property
    def brief(self) -> LoadBrief | None:
        """The ranks' latest load as one engine D times as wide (admission control): pages, held
        pages, decode rows and chunk budgets summed, the step line's per-token cost over D."""
        briefs = [c.brief for c in self.ranks if c.brief is not None]
        if not briefs:
            return None
        d = len(briefs)
        return LoadBrief(sum(b.num_pages for b in briefs), sum(b.held_pages for b in briefs),
                         sum(b.decode_rows for b in briefs), sum(b.chunk_budget for b in briefs),
                         sum(b.step_s for b in briefs) / d, sum(b.token_s for b in briefs) / d / d)

    async def get_load(self, timeout: float = 30.0, step_trace: bool = False) -> DPLoadResp:
        resps: list[LoadResp] = await asyncio.gather(*(c.get_load(timeout, step_trace) for c in self.ranks))
        loads = [r.load for r in resps]
        return DPLoadResp(merge_loads(loads), loads, sum(r.integrity_errors for r in resps))

    async def flush_cache(self, timeout: float = 30.0) -> bool:
        oks = await asyncio.gather(*(c.flush_cache(timeout) for c in self.ranks))
        return all(oks)

    async def hicache_storage(self, backend: str | None, extra: str | None, timeout: float = 30.0) -> str | None:
        errors = await asyncio.gather(*(c.hicache_storage(backend, extra, timeout) for c in self.ranks))
        return next((e for e in errors if e), None)


EngineHandle = EngineClient | DPEngineClient  # what the routes hold: one engine or dp ranks


def engine_client(config: EngineConfig, start_timeout_s: float, on_dead: Callable[[str], None] | None,
                  disagg: DisaggConfig | None) -> EngineHandle:
    """The front's engine handle: one engine, or a DP controller over --dp-size of them."""
    if config.parallel.dp_size > 1:
        return DPEngineClient(config, start_timeout_s, on_dead, disagg)
    return EngineClient(config, start_timeout_s, on_dead, disagg)


