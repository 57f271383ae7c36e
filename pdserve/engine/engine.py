"""The engine: one scheduler iteration per `step()`.

Lifecycle of a request:
  add_request ─ validate ─▶ waiting ─ admit (prefix match, pages) ─▶ running
  running: chunked prefill … the chunk that reaches the end of its tokens samples a token
           ─▶ decode, one token per step ─▶ stop (EOS / stop id / stop string / length)
  finish or abort ─▶ pages released (computed full pages stay in the prefix cache)
Outputs are incremental `TokenOut`s: the tokens each request produced since the last step.
When it goes idle the engine checks KV integrity (free + cached + in use == total).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pdserve.config import EngineConfig, default_threads
from pdserve.engine.io import GenerateReq, LoadInfo, TokenOut
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.request import Request
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import Sampler, SampleResult, SampleRow
from pdserve.engine.sampling_params import SamplingError
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.stop import StopChecker
from pdserve.model.bundled import resolve_model
from pdserve.model.config import ModelConfig
from pdserve.model.loader import load_model, resolve_device, resolve_dtype
from pdserve.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.disagg.config import DisaggConfig

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig, disagg: "DisaggConfig | None" = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or default_threads())
        self.model_path: Path = resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        self.tokenizer = Tokenizer(self.model_path)
        cfg, ps = self.model_config, config.page_size
        num_pages = config.num_pages or KVPool.pages_for_budget(cfg, ps, config.kv_cache_gb, dtype.itemsize)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, (num_pages - 1) * ps)
        self.model = load_model(self.model_path, self.device, dtype, self.max_model_len + 1)
        self.pd = None  # PrefillQueues | DecodeQueues in a PD server
        tensors = None
        if disagg is not None and disagg.mode != "null":
            from pdserve.disagg.setup import pool_tensors  # shared memory for a shm decode

            tensors = pool_tensors(disagg, KVPool.shape(cfg, num_pages, ps), dtype, self.device)
        self.pool = KVPool(cfg, num_pages, ps, self.device, dtype, tensors)
        self.kv = KVManager(num_pages, ps, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.kv, config.chunk_budget, config.max_running, config.decode_headroom)
        self.runner = ModelRunner(self.model, self.pool, self.device)
        self.sampler = Sampler(cfg.vocab_size, self.device)
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(cfg.eos_token_id)
        self.stops = StopChecker(self.tokenizer, self.eos_ids, self.max_model_len)
        self._requests: dict[str, Request] = {}
        self._aborted: list[str] = []
        self._arrivals = 0
        self.num_forward_tokens = 0
        if disagg is not None and disagg.mode != "null":
            from pdserve.disagg.setup import attach_disagg

            self.pd = attach_disagg(self, disagg)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: GenerateReq) -> None:
        """Queue a request; raises SamplingError (a ValueError) naming the bad field."""
        self.validate(req)
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
        self._arrivals += 1
        r = Request(rid=req.rid, prompt_len=len(req.input_ids), params=req.params,
                    tokens=list(req.input_ids), arrival=self._arrivals, generator=gen)
        if self.pd is not None and req.bootstrap is not None:
            self.pd.add(r, req.bootstrap)  # may refuse it (its room is taken): register it only after
        else:
            self.scheduler.add(r)
        self._requests[req.rid] = r

    def validate(self, req: GenerateReq) -> None:
        req.params.validate(self.config.max_top_logprobs)
        ids = req.input_ids
        if not ids:
            raise SamplingError("the prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise SamplingError(
                f"prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens "
                "(the prompt must leave room for at least one new token)", "prompt")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise SamplingError(f"token ids must be in [0, {vocab}); got out-of-vocabulary ids", "input_ids")
        if req.rid in self._requests:
            raise SamplingError(f"request id {req.rid!r} is already in use", "rid")

    def abort(self, rid: str) -> None:
        if rid in self._requests:
            self._aborted.append(rid)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted) or bool(self.pd)

    def is_waiting_on_transfers(self) -> bool:
        """True when the only pending work is KV moving (the caller may sleep briefly)."""
        return bool(self.pd) and not self.scheduler.has_work() and not self._aborted

    # ---- one iteration -------------------------------------------------------------------
    def step(self) -> list[TokenOut]:
        outputs: list[TokenOut] = []
        for rid in self._drain_aborts():
            r = self._requests[rid]
            if self.pd is not None and self.pd.owns(r):
                self.pd.abort(r)  # answered once the transfer is terminal: pages are safe then
            else:
                outputs.append(self.finish_request(r, "abort"))
        if self.pd is not None:
            outputs += self.pd.poll()
            if outputs:  # stream committed first tokens and errors now, not after a forward:
                return outputs  # that would add a decode step to PD TTFT; the next step runs it
        batch = self.scheduler.schedule()
        if batch is None:
            if not self.has_work():
                self.check_integrity()
            return outputs
        self.num_forward_tokens += batch.num_tokens
        logits, sampled = self.runner.forward(batch)
        for c in batch.chunks:
            c.req.num_computed = c.end
        if logits is not None:
            result = self.sampler.sample(logits, [self._sample_row(c.req) for c in sampled])
            for i, c in enumerate(sampled):
                self._append(c.req, i, result)
        handed_off = self.pd.after_forward(batch.chunks) if self.pd is not None else set()
        for c in batch.chunks:
            r = c.req
            if r in handed_off:
                continue
            if r.finished:
                outputs.append(self.finish_request(r, r.finish_reason or "stop"))
            elif r.new_ids:
                outputs.append(self.take_output(r))
        return outputs

    def _drain_aborts(self) -> list[str]:
        rids = [rid for rid in dict.fromkeys(self._aborted) if rid in self._requests]
        self._aborted.clear()
        return rids

    def _sample_row(self, r: Request) -> SampleRow:
        return SampleRow(r.params, r.generator, r.tokens[: r.prompt_len], r.output_ids,
                         self.stops.suppressed(r))

    def _append(self, r: Request, i: int, result: SampleResult) -> None:
        if r.params.max_new_tokens == 0:
            r.finish_reason = "length"
            return
        if r.num_output == 0 and r.transfer is None:  # (a PD prefill caches after its transfer)
            self.kv.cache_prefix(r)  # the prompt is done: share its pages with later requests
        tok = result.token_ids[i]
        r.tokens.append(tok)
        r.new_ids.append(tok)
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
        return out

    def finish_request(self, r: Request, reason: str, keep_in_cache: bool = True) -> TokenOut:
        self.scheduler.finish(r, keep_in_cache=keep_in_cache)
        del self._requests[r.rid]
        r.finish_reason = reason
        return self.take_output(r, reason)

    # ---- introspection -------------------------------------------------------------------
    def load(self) -> LoadInfo:
        return LoadInfo(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + (len(self.pd) if self.pd is not None else 0),  # PD queues too
            num_pages=self.kv.capacity, free_pages=self.kv.allocator.num_free,
            cached_pages=self.kv.cache.num_pages, page_size=self.config.page_size,
            transfer=None if self.pd is None else self.pd.stats)

    def flush_cache(self) -> bool:
        return self.kv.cache.reset()

    def close(self) -> None:
        """Stop PD threads and sockets (the engine process calls this on shutdown)."""
        if self.pd is not None:
            self.pd.close()

    def check_integrity(self) -> None:
        pd_live = [] if self.pd is None else self.pd.live()
        self.kv.check_integrity([*self.scheduler.live(), *pd_live])
