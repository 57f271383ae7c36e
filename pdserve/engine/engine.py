"""The engine: one scheduler iteration per `step()`.

Lifecycle of a request:
  add_request ─ validate ─▶ waiting ─ admit (prefix match, pages) ─▶ running
  running: chunked prefill … the chunk that reaches the end of its tokens samples a token
           ─▶ decode, one token per step ─▶ stop (EOS / stop id / stop string / length)
  finish or abort ─▶ pages released (computed full pages stay in the prefix cache)
A constrained request (structured output) first waits in the grammar queue until its grammar
is compiled off the loop (engine/grammar.py); each step masks its logits and advances its matcher.
A PD request waits in its stage's queues (engine/pd: prefill or decode) while its KV moves;
the stage hands it to the scheduler and back, and tells the engine what finished.
Outputs are incremental `TokenOut`s: the tokens each request produced since the last step.
When it goes idle the engine checks KV integrity (free + cached + in use == total).
A DP-attention rank ends every step with one round with the other ranks (engine/dp_attention.py).
Start-up logs each stage (weights, KV pool); `warm_up()` runs one throw-away request; what the
engine computes is counted in `self.stats` (engine/stats.py: the periodic stats line, gauges).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.batch import ScheduleBatch
from pdserve.engine.config import EngineConfig, keep_freed_memory, set_torch_threads
from pdserve.engine.dp_attention import DPAttentionRank, dp_device, join_dp_attention
from pdserve.engine.grammar import Grammars, GrammarState, grammar_error
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import Bootstrap, GenerateReq, LoadInfo, TokenOut
from pdserve.disagg.messages import KVLayout
from pdserve.engine.pd.build import DPPlace, build_stage, pool_tensors
from pdserve.engine.pd.stage import StagePoll
from pdserve.engine.request import Request
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import Sampler, SampleResult, SampleRow, score_prompt
from pdserve.engine.sampling_params import SamplingError, SamplingParams, check_prompt
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.stats import EngineStats
from pdserve.engine.stop import StopChecker
from pdserve.engine.tp_worker import TPRanks, rank_threads, resolved_config
from pdserve.model.bundled import resolve_model
from pdserve.model.config import ModelConfig
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.tokenizer import Tokenizer
from pdserve.model.tp import Collectives, NoCollectives, TPShard

log = logging.getLogger(__name__)


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations (Linux MemAvailable, else physical)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class Engine:
    def __init__(self, config: EngineConfig, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        self.device = dp_device(config, resolve_device(config.device))
        dtype = resolve_dtype(config.dtype)
        set_torch_threads(config.threads)
        self.model_path: Path = resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        self.tokenizer_path: Path = resolve_model(config.tokenizer) if config.tokenizer else self.model_path
        self.tokenizer = Tokenizer(self.tokenizer_path, config.chat_template)
        cfg, ps = self.model_config, config.page_size
        shard = TPShard(config.dp_rank, config.tp_size, dp_attention=True) if config.enable_dp_attention else \
            TPShard(0, config.tp_size)
        local = shard.local_config(cfg)  # a tp size that does not fit fails here, before any weight loads
        wanted_len = config.max_model_len or cfg.max_position_embeddings
        log.info("loading weights of %s (%d layers, hidden %d) on %s in %s", self.model_path.name,
                 cfg.num_hidden_layers, cfg.hidden_size, self.device, config.dtype)
        # the pool's size is known before the weights load, except with --mem-fraction-static
        # (a fraction of what is left after them): RoPE tables then cover the model's length
        num_pages = config.num_pages or (None if config.mem_fraction_static is not None else
                                         KVPool.pages_for_budget(local, ps, config.kv_cache_gb, dtype.itemsize))
        self.ranks: TPRanks | None = None
        if config.num_processes > 1:
            set_torch_threads(rank_threads(config))
        if config.attn_tp_size > 1:
            self.ranks = TPRanks.start(resolved_config(config, cfg), self.device, disagg)
        dp_group = join_dp_attention(config, self.device)  # DP attention: the MLP's group
        comm: Collectives = dp_group or (self.ranks.group if self.ranks is not None else NoCollectives())
        t0 = time.perf_counter()
        rope_len = min(wanted_len, (num_pages - 1) * ps) if num_pages else wanted_len
        self.model = load_model(self.model_path, self.device, dtype, rope_len + 1, shard, comm, config.cpu_prepack,
                                config.quantization)
        weights_gb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**30
        self.load_weights_s = time.perf_counter() - t0
        log.info("weights loaded in %.1f s (%.2f GB)", self.load_weights_s, weights_gb)
        if num_pages is None:
            num_pages = KVPool.pages_for_budget(local, ps, self._kv_budget_gb(), dtype.itemsize)
        self.max_model_len = min(wanted_len, (num_pages - 1) * ps)
        tensors = pool_tensors(disagg, KVPool.shape(local, num_pages, ps), dtype, self.device)
        self.pool = KVPool(local, num_pages, ps, self.device, dtype, tensors)
        log.info("KV pool: %d pages of %d tokens = %d tokens, %.2f GB; context length %d", num_pages, ps,
                 num_pages * ps, num_pages * self.pool.page_bytes() / 2**30, self.max_model_len)
        self.kv = KVManager(num_pages, ps, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.kv, config.chunk_budget, config.max_running, config.decode_headroom)
        keep_freed_memory()  # after the weights and the pool: they keep their own mappings
        self.stats = EngineStats(config.log_stats_interval_s)
        self.dp = DPAttentionRank(dp_group, self.model, self.stats) if dp_group is not None else None
        publish = self.ranks.publish if self.ranks is not None else self.dp.before_forward if self.dp else None
        self.runner = ModelRunner(self.model, self.pool, self.device, publish, config.attention_backend)
        self.sampler = Sampler(cfg.vocab_size, self.device)
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(cfg.eos_token_id)
        self.stops = StopChecker(self.tokenizer, self.eos_ids, self.max_model_len)
        self._requests: dict[str, Request] = {}
        self.grammars = Grammars(self.tokenizer.hf, cfg.vocab_size, self.eos_ids)
        self._grammar_wait: dict[Request, tuple[Bootstrap | None, Future]] = {}  # compiling
        self._aborted: list[str] = []
        self._arrivals = 0
        self.num_forward_tokens = 0
        self.stage = build_stage(disagg, KVLayout.for_pool(self.model_path.name, self.pool.k, ps, shard.kv_heads(cfg)[0],
                                                           cfg.num_key_value_heads),
                                 self.pool, self.scheduler, self.kv, self.stops, cfg.vocab_size,
                                 self.ranks.peers(config) if self.ranks is not None else None,
                                 DPPlace(config.dp_rank, config.dp_size))

    def _kv_budget_gb(self) -> float:
        """GiB for the KV pool: --mem-fraction-static of the memory left now (weights loaded)."""
        fraction = self.config.mem_fraction_static
        assert fraction is not None
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0]
        else:
            available = available_host_memory()
        return fraction * available / (1 << 30)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: GenerateReq) -> None:
        """Queue a request; raises SamplingError (a ValueError) naming the bad field."""
        self.validate(req)
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
        self._arrivals += 1
        r = Request(rid=req.rid, prompt_len=len(req.input_ids), params=req.params,
                    tokens=[*req.input_ids, *req.output_ids], arrival=self._arrivals, generator=gen, t_arrival=time.monotonic())
        if req.return_prompt_logprobs:
            r.prompt_lp, r.prompt_lp_from = [None] * r.prompt_len, min(max(req.prompt_logprobs_from, 0), r.prompt_len)
            r.prompt_top = [[] for _ in range(r.prompt_len)] if req.params.top_logprobs > 0 else None
        leader = self._requests.get(req.share_prompt_with) if req.share_prompt_with else None
        if leader is not None and leader.tokens[: leader.prompt_len] == r.tokens:
            r.leader = leader  # the scheduler admits r once leader's prompt pages are cached
        if req.params.grammar is not None:  # joins the scheduler / stage once compiled (poll_grammars)
            self._grammar_wait[r] = (req.bootstrap, self.grammars.submit(req.params.grammar))
        elif req.bootstrap is not None:
            self.stage.add(r, req.bootstrap)  # may refuse it (its room is taken): register it only after
        else:
            self.scheduler.add(r)
        self._requests[req.rid] = r

    def _poll_grammars(self) -> list[TokenOut]:
        """Requests whose grammar compiled go on (scheduler or PD stage); failed ones get a 400."""
        outputs = []
        for r, (boot, fut) in [(r, w) for r, w in self._grammar_wait.items() if w[1].done()]:
            del self._grammar_wait[r]
            spec = r.params.grammar
            assert spec is not None
            try:
                r.grammar = GrammarState(fut.result())
            except Exception as exc:  # an invalid schema / regex / grammar
                self.grammars.forget(spec)
                outputs.append(self._refuse(r, f"{spec.param}: invalid {spec.kind.replace('_', ' ')}: "
                                               f"{grammar_error(exc)}"))
                continue
            try:
                self.stage.add(r, boot) if boot is not None else self.scheduler.add(r)
            except ValueError as exc:  # the stage refused it (its room is taken)
                outputs.append(self._refuse(r, str(exc)))
        return outputs

    def _refuse(self, r: Request, error: str) -> TokenOut:
        out = self.finish_request(r, "abort")
        out.error, out.error_status = error, 400
        return out

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
                or bool(self._grammar_wait))

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
        outputs = self._abort_requests()
        if self._grammar_wait:
            outputs += self._poll_grammars()
        polled = self._finish_polled(self.stage.poll())
        if polled:  # stream committed first tokens and errors now, not after a forward:
            return outputs + polled  # that would add a decode step to PD TTFT; the next step runs it
        batch = self.scheduler.schedule()
        if batch is None:
            if not self.has_work():
                self.check_integrity()
            return outputs
        now = time.monotonic()
        for c in batch.chunks:
            if c.req.t_admitted is None:
                c.req.t_admitted = now
        self.stats.on_forward(sum(c.length for c in batch.chunks if c.end <= c.req.prompt_len or c.length > 1), 0)
        self._forward(batch)
        handed_off = self.stage.after_forward(batch.chunks)
        for r in (c.req for c in batch.chunks if c.req not in handed_off):
            if r.finished:
                outputs.append(self.finish_request(r, r.finish_reason or "stop"))
            elif r.new_ids:
                outputs.append(self.take_output(r))
        return outputs

    def _abort_requests(self) -> list[TokenOut]:
        """Aborts since the last step: a stage's request is answered once its transfer is terminal."""
        rids = [rid for rid in dict.fromkeys(self._aborted) if rid in self._requests]
        self._aborted.clear()
        outputs = []
        for r in (self._requests[rid] for rid in rids):
            if self._grammar_wait.pop(r, None) is not None:
                outputs.append(self.finish_request(r, "abort"))  # still compiling: holds nothing
            elif self.stage.owns(r):
                self.stage.abort(r)  # answered once the transfer is terminal: pages are safe then
            else:
                outputs.append(self.finish_request(r, "abort"))
        return outputs

    def _finish_polled(self, polled: StagePoll) -> list[TokenOut]:
        outputs = []
        for f in polled.finished:
            out = self.finish_request(f.req, f.reason, keep_in_cache=f.keep_in_cache)
            if f.error is not None:
                out.error, out.error_status = f.error, f.status
            outputs.append(out)
        for r in polled.progressed:
            outputs.append(self.finish_request(r, r.finish_reason or "stop") if r.finished else self.take_output(r))
        return outputs

    def _forward(self, batch: ScheduleBatch) -> None:
        """Run the batch, advance the counters, sample and append the sampled rows' tokens."""
        self.num_forward_tokens += batch.num_tokens
        t0 = time.perf_counter()
        logits, sampled, prompt_rows = self.runner.forward(batch)
        for c in batch.chunks:
            c.req.num_computed = c.end
        for c, positions, rows in prompt_rows:
            score_prompt(c.req, positions, rows)
        if logits is not None:
            states = [c.req.grammar for c in sampled]
            if any(s is not None for s in states):
                self.grammars.mask(logits, states)  # disallowed tokens -> -inf, constrained rows only
            result = self.sampler.sample(logits, [self._sample_row(c.req) for c in sampled])
            for i, c in enumerate(sampled):
                self._append(c.req, i, result)
        self.stats.on_forward_time(time.perf_counter() - t0, batch.num_tokens)

    def _sample_row(self, r: Request) -> SampleRow:
        return SampleRow(r.params, r.generator, r.tokens[: r.prompt_len], r.output_ids,
                         self.stops.suppressed(r))

    def _append(self, r: Request, i: int, result: SampleResult) -> None:
        if r.params.max_new_tokens == 0:
            r.finish_reason = "length"
            return
        if r.num_output == 0:  # the prompt is done: share its pages with later requests
            if r.transfer is None:
                self.kv.cache_prefix(r)
            else:  # a PD prefill: its sends name its own page ids, which must stay its own
                self.kv.share_prefix(r)
        tok = result.token_ids[i]
        if r.t_first_token is None:
            r.t_first_token = time.monotonic()
        r.tokens.append(tok)
        r.new_ids.append(tok)
        if r.grammar is not None:
            r.grammar.accept(tok)
        if result.logprobs is not None and (r.params.logprobs or r.params.top_logprobs):
            r.new_logprobs.append(result.logprobs[i])
            if result.top_logprobs is not None:
                r.new_top.append(result.top_logprobs[i])
        self.stops.check(r)

    def take_output(self, r: Request, finish_reason: str | None = None) -> TokenOut:
        wants_lp = r.params.logprobs or r.params.top_logprobs > 0
        out = TokenOut(
            rid=r.rid, token_ids=r.new_ids,
            logprobs=r.new_logprobs if wants_lp else None,
            top_logprobs=r.new_top if r.params.top_logprobs > 0 else None,
            finish_reason=finish_reason, matched_stop=r.matched_stop if finish_reason else None,
            prompt_tokens=r.prompt_len, completion_tokens=r.num_output, cached_tokens=r.cached_tokens)
        r.new_ids, r.new_logprobs, r.new_top = [], [], []
        if r.prompt_lp is not None and (r.num_computed >= r.prompt_len or finish_reason is not None):
            out.prompt_logprobs = r.prompt_lp[r.prompt_lp_from:]  # once: the prompt ran (or never will)
            out.prompt_top_logprobs = r.prompt_top[r.prompt_lp_from:] if r.prompt_top is not None else None
            r.prompt_lp = r.prompt_top = None
        return out

    def finish_request(self, r: Request, reason: str, keep_in_cache: bool = True) -> TokenOut:
        self.scheduler.finish(r, keep_in_cache=keep_in_cache)
        del self._requests[r.rid]
        r.finish_reason = reason
        self.stats.on_finish(r.prompt_len, r.cached_tokens)
        out = self.take_output(r, reason)
        now = time.monotonic()
        admitted = r.t_admitted if r.t_admitted is not None else now
        first = r.t_first_token if r.t_first_token is not None else now
        out.queue_time_s = max(0.0, admitted - r.t_arrival)
        out.prefill_time_s = max(0.0, first - admitted)
        out.decode_time_s = max(0.0, now - first)
        return out

    # ---- introspection -------------------------------------------------------------------
    def load(self, step_trace: bool = False) -> LoadInfo:
        st = self.stats
        return LoadInfo(
            num_running=self.scheduler.num_running,
            num_waiting=len(self.scheduler.waiting) + self.stage.pending() + len(self._grammar_wait),
            num_pages=self.kv.capacity, free_pages=self.kv.allocator.num_free,
            cached_pages=self.kv.cache.num_pages, page_size=self.config.page_size,
            transfer=self.stage.stats, gen_throughput=self.stats.gen_throughput,
            prompt_throughput=self.stats.prompt_throughput, cache_hit_rate=self.stats.cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_computed=self.stats.prompt_tokens,
            cache_queries=self.stats.cache_queries, cache_hits=self.stats.cache_hits,
            dp_rank=self.config.dp_rank, pid=os.getpid(), steps=st.steps, step_seconds=st.step_seconds, idle_steps=st.idle_steps,
            step_trace=list(st.trace) if step_trace else None)

    def log_stats(self) -> str | None:
        """The periodic stats line (engine/stats.py), when it is due."""
        kv = self.kv
        used = (kv.capacity - kv.allocator.num_free) * self.config.page_size
        return self.stats.maybe_log(self.scheduler.num_running, len(self.scheduler.waiting) + self.stage.pending(),
                                    used, kv.capacity * self.config.page_size, self.scheduler.num_preemptions)

    def flush_cache(self) -> bool:
        return self.kv.cache.reset()

    def close(self) -> None:
        """Stop PD threads and sockets and the other tp ranks (the engine process calls this on
        shutdown)."""
        self.stage.close()
        self.grammars.close()
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
        if self.dp is not None:
            self.dp.close()
            self.dp = None

    def check_integrity(self) -> None:
        self.kv.check_integrity([*self.scheduler.live(), *self.stage.live()])
