"""The engine: one scheduler iteration per `step()`.

Lifecycle of a request:
  add_request ─ validate ─▶ waiting ─ admit (prefix match, pages) ─▶ running
  running: chunked prefill … the chunk that reaches the end of its tokens samples a token
           ─▶ decode, one token per step ─▶ stop (EOS / stop id / stop string / length)
  finish or abort ─▶ pages released (computed full pages stay in the prefix cache)
A constrained request first waits in the grammar queue until its grammar is compiled off the
loop (engine/grammar.py); each step masks its logits and advances its matcher. A request with a
deadline whose prefill cannot begin in time is dropped with a 503 (engine/deadlines.py). Every output
token enters its request through `accept_token` (engine/accept.py). Outputs are incremental
`TokenOut`s: the tokens each request produced since the last step. When it goes idle the engine
checks KV integrity (free + cached + in use == total). A DP-attention rank ends every step with
one round with the other ranks (engine/dp_attention.py). `Engine.build(config, disagg)`
assembles the parts (engine/build.py); `warm_up()` runs one throw-away request; what the engine
computes is counted in `self.stats` (engine/stats.py: the periodic stats line, gauges).

Seams, each a Protocol with a do-nothing default, where a feature plugs in without touching the step:
  stage        PD (engine/pd/stage.py): a PD request waits in its stage's queues while its KV
               moves; the stage hands it to the scheduler and back, and says what finished.
               NullStage: unified. A live role switch (`switch_stage`, server/elastic.py) swaps it
               for another mode's on the same weights and pool once the engine is idle.
  speculator   speculative decoding around the forward (engine/speculate.py): drafts proposed
               before it, verified after sampling, each accepted token through accept_token.
               NoSpeculation: plain decoding; engine/spec/: n-gram, suffix, draft model.
  KV tier      under the prefix cache (engine/prefix_cache.py's KVTier): a match may promote
               pages from a lower tier, an eviction may demote them. NoTier: the device only.
"""
from __future__ import annotations

import os
import time

import torch

from pdserve.disagg import DisaggConfig
from pdserve.engine.accept import accept_token
from pdserve.engine.batch import Chunk, ScheduleBatch
from pdserve.engine.build import EngineParts, build_parts
from pdserve.engine.config import EngineConfig
from pdserve.engine.deadlines import Deadlines
from pdserve.engine.grammar import GrammarQueue
from pdserve.engine.messages import Bootstrap, GenerateReq, LoadBrief, LoadInfo, TokenOut
from pdserve.engine.pd.stage import StagePoll
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult, SampleRow, score_prompt
from pdserve.engine.sampling_params import SamplingError, SamplingParams, check_prompt
from pdserve.engine.stats import expert_load


class Engine:
    def __init__(self, parts: EngineParts) -> None:
        p = parts
        self.config, self.device, self.model_config, self.model_path = p.config, p.device, p.model_config, p.model_path
        self.tokenizer, self.tokenizer_path, self.eos_ids = p.tokenizer, p.tokenizer_path, p.eos_ids
        self.model, self.load_weights_s, self.max_model_len = p.model, p.load_weights_s, p.max_model_len
        self.pool, self.kv, self.scheduler, self.stats = p.pool, p.kv, p.scheduler, p.stats
        self.ranks, self.dp, self.runner, self.sampler = p.ranks, p.dp, p.runner, p.sampler
        self.stops, self.grammars, self.speculator, self.stage = p.stops, p.grammars, p.speculator, p.stage
        self.disagg, self.make_stage = p.disagg, p.make_stage
        self.grammar_wait: GrammarQueue[Request] = GrammarQueue(self.grammars)  # compiling
        self._requests: dict[str, Request] = {}
        self._aborted: list[str] = []
        self.deadlines = Deadlines()  # TTFT deadlines of requests whose prefill has not begun
        self._arrivals = 0
        self.num_forward_tokens = 0

    @classmethod
    def build(cls, config: EngineConfig, disagg: DisaggConfig | None = None) -> Engine:
        """An engine with the parts its config asks for (engine/build.py)."""
        return cls(build_parts(config, disagg))

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: GenerateReq) -> None:
        """Queue a request; raises SamplingError (a ValueError) naming the bad field."""
        self.validate(req)
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
        self._arrivals += 1
        r = Request(rid=req.rid, prompt_len=len(req.input_ids), params=req.params,
                    tokens=[*req.input_ids, *req.output_ids], arrival=self._arrivals, generator=gen,
                    t_arrival=time.monotonic(), priority=req.priority, deadline=req.deadline)
        if req.deadline is not None:
            self.deadlines.add(r)
        if req.return_prompt_logprobs:
            r.prompt_lp, r.prompt_lp_from = [None] * r.prompt_len, min(max(req.prompt_logprobs_from, 0), r.prompt_len)
            r.prompt_top = [[] for _ in range(r.prompt_len)] if req.params.top_logprobs > 0 else None
        leader = self._requests.get(req.share_prompt_with) if req.share_prompt_with else None
        if leader is not None and leader.tokens[: leader.prompt_len] == r.tokens:
            r.leader = leader  # the scheduler admits r once leader's prompt pages are cached
        if req.params.grammar is not None:  # joins the scheduler / stage once compiled (poll_grammars)
            self.grammar_wait.add(r, req.params.grammar, req.bootstrap)
        else:
            self._enqueue(r, req.bootstrap)  # may refuse it (its room is taken): register it only after
        self._requests[req.rid] = r

    def _enqueue(self, r: Request, boot: Bootstrap | None) -> None:
        """To the PD stage (which may refuse it: ValueError) or the scheduler."""
        if boot is not None:
            self.stage.add(r, boot)
        else:
            self.scheduler.add(r)

    def _poll_grammars(self) -> list[TokenOut]:
        """Requests whose grammar compiled go on (scheduler or PD stage); failed ones get a 400."""
        ready, refused = self.grammar_wait.poll()
        outputs = [self.finish_request(r, "abort", error=why) for r, why in refused]
        for r, state, boot in ready:
            r.grammar = state
            try:
                self._enqueue(r, boot)
            except ValueError as exc:  # the stage refused it (its room is taken)
                outputs.append(self.finish_request(r, "abort", error=str(exc)))
        return outputs

    def validate(self, req: GenerateReq) -> None:
        req.params.validate(self.config.max_top_logprobs)
        check_prompt(req.input_ids, self.model_config.vocab_size, self.max_model_len,
                     "input_ids" if req.input_ids else "prompt")
        bias = req.params.logit_bias or {}
        if bias and max(bias) >= self.model_config.vocab_size:
            raise SamplingError(f"logit_bias token id {max(bias)} is out of vocabulary", "logit_bias")
        if req.rid in self._requests:
            raise SamplingError(f"request id {req.rid!r} is already in use", "rid")

    def abort(self, rid: str) -> None:
        if rid in self._requests:
            self._aborted.append(rid)

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or bool(self._aborted) or self.stage.pending() > 0
                or bool(self.grammar_wait))

    def is_waiting_on_transfers(self) -> bool:
        """True when the only pending work is KV moving (the caller may sleep briefly)."""
        return self.stage.pending() > 0 and not self.scheduler.has_work() and not self._aborted

    # ---- one iteration -------------------------------------------------------------------
    def warm_up(self) -> float:
        """One short greedy request through the whole path (admission, forward, sampling, stop
        checks), so the first real request does not pay for first-use allocations; its pages
        and prefix-cache entries are dropped and the stats forgotten. Returns its seconds."""
        t0 = time.perf_counter()
        ids = self.tokenizer.encode("Warm-up: the quick brown fox", add_special_tokens=False)[:16] or [0]
        self.add_request(GenerateReq(rid="__pdserve_warmup__", input_ids=ids,
                                     params=SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)))
        while self.has_work():
            self.step()
        self.kv.flush()  # KV tiers: its copies land before the cache is dropped
        self.kv.cache.reset()
        self.stats.reset()
        self.check_integrity()
        return time.perf_counter() - t0

    def step(self) -> list[TokenOut]:
        if self.ranks is not None:
            self.ranks.check_alive()  # also while PD rooms wait and no forward would notice
        outputs = self._step()
        self.stats.on_forward(0, sum(len(o.token_ids) for o in outputs))
        if self.dp is not None:
            self.dp.finish_round(self.has_work())  # an idle forward if this step ran none
        return outputs

    def _step(self) -> list[TokenOut]:
        if self.deadlines:
            self._aborted += self.deadlines.expire(self._requests, self.config.chunk_budget,
                                                   self.scheduler.num_running, *self.stats.step_model.line())
        outputs = self._abort_requests()
        if self.grammar_wait:
            outputs += self._poll_grammars()
        polled = self._finish_polled(self.stage.poll())
        if polled:  # stream committed first tokens and errors now, not after a forward:
            return outputs + polled  # that would add a decode step to PD TTFT; the next step runs it
        batch = self.scheduler.schedule()
        if batch is None:
            if not self.has_work():
                self.check_integrity()
            return outputs
        self._forward(batch)
        return outputs + self._after_forward(batch.chunks)

    def _after_forward(self, chunks: list[Chunk]) -> list[TokenOut]:
        """The stage takes what it hands off; every other request that progressed is reported."""
        handed_off = self.stage.after_forward(chunks)
        outputs = []
        for r in (c.req for c in chunks if c.req not in handed_off):
            if r.finished:
                outputs.append(self.finish_request(r, r.finish_reason or "stop"))
            elif r.new_ids:
                outputs.append(r.take_output())
        return outputs

    def _abort_requests(self) -> list[TokenOut]:
        """Aborts since the last step: a stage's request is answered once its transfer is terminal."""
        rids = [rid for rid in dict.fromkeys(self._aborted) if rid in self._requests]
        self._aborted.clear()
        outputs = []
        for r in (self._requests[rid] for rid in rids):
            if self.grammar_wait.discard(r):
                outputs.append(self.finish_request(r, "abort"))  # still compiling: holds nothing
            elif self.stage.owns(r):
                self.stage.abort(r)  # answered once the transfer is terminal: pages are safe then
            else:
                outputs.append(self.finish_request(r, "abort"))
        return outputs

    def _finish_polled(self, polled: StagePoll) -> list[TokenOut]:
        outputs = [self.finish_request(f.req, f.reason, f.keep_in_cache, f.error, f.status) for f in polled.finished]
        for r in polled.progressed:
            outputs.append(self.finish_request(r, r.finish_reason or "stop") if r.finished else r.take_output())
        return outputs

    def _forward(self, batch: ScheduleBatch) -> None:
        """Run the batch, advance the counters, sample, and accept the tokens the speculator
        verifies (without speculation: each sampled row's one token)."""
        now = time.monotonic()
        for c in batch.chunks:
            if c.req.t_admitted is None:
                c.req.t_admitted = now
        self.stats.on_forward(sum(c.length for c in batch.chunks if c.end <= c.req.prompt_len or c.length > 1), 0)
        batch = self.speculator.propose(batch)
        self.num_forward_tokens += batch.num_tokens
        t0 = time.perf_counter()
        logits, sampled, prompt_rows = self.runner.forward(batch)
        for c in batch.chunks:
            c.req.num_computed = c.end  # drafts: the speculator moves it on by what it accepts
        for c, positions, rows in prompt_rows:
            score_prompt(c.req, positions, rows)
        if logits is not None:
            states = [c.req.grammar for c, _ in sampled]
            if any(s is not None for s in states):  # disallowed tokens -> -inf, constrained rows only
                self.grammars.mask(logits, states, [c.drafts[:j] for c, j in sampled])
            rows = [self._sample_row(c.req, c.drafts[:j]) for c, j in sampled]
            self.speculator.verify(sampled, logits, rows, self.sampler.sample(logits, rows), self._accept)
        self.stats.on_forward_time(time.perf_counter() - t0, batch.num_tokens)

    def _sample_row(self, r: Request, ahead: tuple[int, ...] = ()) -> SampleRow:
        """Row of `r` after its output and `ahead` (the drafts before a verified row)."""
        out = r.output_ids + list(ahead) if ahead else r.output_ids
        return SampleRow(r.params, r.generator, r.tokens[: r.prompt_len], out, self.stops.suppressed(r, len(ahead)))

    def _accept(self, r: Request, i: int, result: SampleResult) -> bool:
        """Accept row `i`'s token into `r`; True if `r` is finished (accept no more of its rows)."""
        if r.params.max_new_tokens == 0:
            r.finish_reason = "length"
            return True
        if r.num_output == 0:  # the prompt is done: share its pages with later requests
            if r.transfer is None:
                self.kv.cache_prefix(r)
            else:  # a PD prefill: its sends name its own page ids, which must stay its own
                self.kv.share_prefix(r)
        if r.t_first_token is None:
            r.t_first_token = time.monotonic()
        lp, top = result.logprob_entries(i, r.params)
        return accept_token(r, result.token_ids[i], lp, top, self.stops)

    def finish_request(self, r: Request, reason: str, keep_in_cache: bool = True, error: str | None = None,
                       status: int = 400) -> TokenOut:
        """Release `r` (pages back) and answer it; `error` (HTTP `status`) when it failed."""
        self.scheduler.finish(r, keep_in_cache=keep_in_cache)
        self.speculator.release(r)
        del self._requests[r.rid]
        r.finish_reason = reason
        self.stats.on_finish(r.prompt_len, r.cached_tokens)
        out = r.take_output(reason)
        expired = self.deadlines.reason(r.rid)
        if error is None and expired is not None:  # dropped at its deadline (engine/deadlines.py)
            error, status, out.error_code = expired, 503, "deadline_exceeded"
        if error is not None:
            out.error, out.error_status = error, status
        return out

    # ---- introspection -------------------------------------------------------------------
    def load(self, step_trace: bool = False) -> LoadInfo:
        st = self.stats
        return LoadInfo(
            num_running=self.scheduler.num_running,
            num_waiting=len(self.scheduler.waiting) + self.stage.pending() + len(self.grammar_wait),
            num_pages=self.kv.capacity, free_pages=self.kv.allocator.num_free,
            cached_pages=self.kv.cache.num_pages, evictable_pages=self.kv.cache.evictable_pages(),
            page_size=self.config.page_size,
            transfer=self.stage.stats, gen_throughput=self.stats.gen_throughput,
            prompt_throughput=self.stats.prompt_throughput, cache_hit_rate=self.stats.cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_computed=self.stats.prompt_tokens,
            cache_queries=self.stats.cache_queries, cache_hits=self.stats.cache_hits,
            dp_rank=self.config.parallel.dp_rank, pid=os.getpid(), steps=st.steps, step_seconds=st.step_seconds,
            idle_steps=st.idle_steps, step_trace=list(st.trace) if step_trace else None, tiers=self.kv.tier_load(),
            spec=self.speculator.stats,
            experts=expert_load(self.model, self.config.parallel.ep_ranks))

    def brief(self) -> LoadBrief:
        """The load admission control reads (sent with every TokenOutBatch)."""
        kv, a_b = self.kv, self.stats.step_model.line()
        held = kv.capacity - kv.allocator.num_free - kv.cache.num_pages  # (a locked prefix counts as cache)
        rows = sum(1 for r in self.scheduler.running if r.num_computed >= r.prompt_len)
        return LoadBrief(kv.capacity, held, rows, self.config.chunk_budget, *a_b)

    def log_stats(self) -> str | None:
        """The periodic stats line (engine/stats.py), when it is due."""
        kv = self.kv
        used = (kv.capacity - kv.allocator.num_free) * self.config.page_size
        return self.stats.maybe_log(self.scheduler.num_running, len(self.scheduler.waiting) + self.stage.pending(),
                                    used, kv.capacity * self.config.page_size, self.scheduler.num_preemptions)

    def flush_cache(self) -> bool:
        self.kv.flush()  # KV tiers: copies in flight land first
        return self.kv.cache.reset()

    def set_storage(self, backend: str | None, extra: str | None = None) -> None:
        """Attach / detach the KV tiers' storage backend; ValueError unless idle (SGLang's rule)."""
        if self.has_work():
            raise ValueError("the server is not idle: attach or detach the storage backend with no request "
                             "running or waiting")
        self.kv.set_storage(backend, extra)

    def switch_stage(self, disagg: DisaggConfig) -> None:
        """A live role switch: close the PD stage and build `disagg`'s (its mode and epoch) over the
        same weights and KV pool. Only an idle engine of one process switches (the front drained it;
        ValueError otherwise). The prefix cache is flushed: the other role's pages go, and KV-event
        subscribers start clean. If the new stage cannot be built the old mode is rebuilt and the
        error raised."""
        if self._requests or self.has_work():
            raise ValueError("the engine still has requests: drain it first")
        if self.ranks is not None or self.dp is not None or self.config.parallel.dp_size > 1:
            raise ValueError("a live role switch needs --tp-size 1 and --dp-size 1")
        if disagg.backend == "shm":
            raise ValueError("a live role switch needs a transfer backend whose decode pool is the engine's own "
                             "(not shm: its decode pool lives in shared memory from the start)")
        self.stage.close()
        self.flush_cache()
        try:
            self.stage = self.make_stage(disagg)
        except BaseException:
            self.stage = self.make_stage(self.disagg)
            raise
        self.disagg = disagg
        self.kv.set_role(disagg.mode == "decode")
        self.check_integrity()

    def close(self) -> None:
        """Stop PD threads and sockets and the other tp ranks (the engine process calls this on
        shutdown)."""
        self.stage.close()
        self.grammars.close()
        self.kv.close()  # KV tiers: queued copies finish, the storage client closes
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
        if self.dp is not None:
            self.dp.close()
            self.dp = None

    def check_integrity(self) -> None:
        self.kv.check_integrity([*self.scheduler.live(), *self.stage.live()])
