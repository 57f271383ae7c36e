"""Speculative decoding in the engine step: propose drafts for decode chunks, verify them in the
forward that computes them, keep what the target agrees with, roll back the rest.

Per step (the seam in engine/speculate.py):

  propose(batch)
    candidates   chunks that decode (one token, output started), at most disable_by_batch_size
    limits       k <= num_draft_tokens, <= max_new_tokens left - 1, inside the context
    proposals    n-gram / suffix propose first (free) and the grammar cuts them where it refuses
                 a token; the adaptive rule (adaptive.py) picks each request's k from them; a draft
                 model proposes after that, only for those with k > 0 (its forwards cost)
    pages        the chunk budget, then pages for the drafts from the FREE list only (speculation
                 never evicts the prefix cache or preempts a request; it shortens k instead)
    generators   a seeded request's generator state is kept: verify rewinds it
  verify(rows, ...) per chunk with drafts d0..dk-1, rows r0..rk (engine/batch.py):
    draft model, sampled request: the rows' tokens are redrawn by the rejection rule (draft.py)
    accept r0, r1, ... through the engine's accept path while the row's token equals the draft
    before it: row j's token t_j is the target's after tokens + d0..dj-1; t_j == dj accepts dj and
    goes on, t_j != dj is the correction (still accepted) and ends it; rk is the bonus. For a
    draft-free proposer this IS the rejection rule of a point-mass draft: P(accept dj) = p(dj),
    and the refused case gives t_j ~ p without dj, renormalised.
    rollback     m tokens accepted:
                   before   tokens [... last]            KV valid  [0, end)   end = len before
                   forward  computes last d0 .. dk-1     KV written [end-1, end+k)
                   after    tokens [... last t0 .. tm-1] num_computed = end + m - 1 = len - 1:
                            positions end .. end+m-2 hold d0..dm-2 = t0..tm-2; the rest is junk
                 private pages past len(tokens) go back to the free list; the radix cache only
                 ever inserts tokens[:num_computed], so a refused draft never reaches it (nor the
                 client: it never enters `tokens`); a seeded generator is rewound to the kept state
                 and advanced by m draws, exactly the draws m tokens take one by one
    stats        verify calls, drafts, accepted, accepted length per verify; alpha per request
  release(req)   the proposer and the rule forget it (suffix: its output joins the corpus)

The forward's time (propose -> verify) feeds the cost model with its token count.
"""

from __future__ import annotations

import copy
import time
from typing import Protocol

import torch

from pdserve.engine.batch import Chunk, Row, ScheduleBatch
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import SpecStats
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult, SampleRow, skip_draw
from pdserve.engine.spec.adaptive import AdaptivePolicy, StepCost
from pdserve.engine.speculate import Accept

MIN_DRAFTS_FOR_RATE = 16  # drafts verified before the proposer's own acceptance replaces the prior


class Proposer(Protocol):
    name: str
    draft_free: bool  # True: proposals cost nothing, made before the rule; False: a draft model

    def propose(self, reqs: list[Request], limits: list[int]) -> list[tuple[int, ...]]:
        """Up to `limits[i]` drafts for request i (a draft model: exactly that many, or fewer)."""
        ...

    def resample(self, c: Chunk, first: int, logits: torch.Tensor, rows: list[SampleRow],
                 result: SampleResult) -> None:
        """Before acceptance: rewrite the chunk's row tokens in `result` where its rule is not
        the exact-match one (a draft model's sampled drafts)."""
        ...

    def release(self, req: Request) -> None: ...


class SpecDecoding:
    def __init__(self, proposer: Proposer, policy: AdaptivePolicy, cost: StepCost, kv: KVManager,
                 num_draft_tokens: int, disable_by_batch_size: int, chunk_budget: int, max_model_len: int,
                 vocab_size: int) -> None:
        self.proposer, self.policy, self.cost, self.kv = proposer, policy, cost, kv
        self.k, self.max_batch, self.chunk_budget = num_draft_tokens, disable_by_batch_size, chunk_budget
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self._stats = SpecStats(proposer.name, num_draft_tokens, accept_lengths=[0] * (num_draft_tokens + 1))
        self._saved: dict[Request, torch.Tensor] = {}  # seeded generators' states before the forward
        self._started: tuple[float, int] | None = None  # this forward: perf_counter, tokens

    @property
    def stats(self) -> SpecStats:
        return copy.deepcopy(self._stats)

    # ---- before the forward -----------------------------------------------------------------
    def propose(self, batch: ScheduleBatch) -> ScheduleBatch:
        batch = self._propose(batch)
        self._started = (time.perf_counter(), batch.num_tokens)
        return batch

    def _propose(self, batch: ScheduleBatch) -> ScheduleBatch:
        cands = [c for c in batch.chunks if c.samples and c.length == 1 and c.req.num_output > 0]
        if not cands or len(cands) > self.max_batch:
            return batch
        reqs = [c.req for c in cands]
        limits = [self._limit(r) for r in reqs]
        proposals: list[tuple[int, ...]] = [()] * len(reqs)
        if self.proposer.draft_free:
            proposals = [self._grammar_cut(r, p) for r, p in zip(reqs, self.proposer.propose(reqs, limits))]
            limits = [len(p) for p in proposals]
        self.policy.global_rate = self._rate()
        ks = self.policy.choose(sum(1 for c in batch.chunks if c.samples), batch.num_tokens, reqs, limits)
        ks = self._fit(reqs, ks, self.chunk_budget - batch.num_tokens)
        self._stats.skipped += sum(1 for k, lim in zip(ks, limits) if lim and not k)
        if not self.proposer.draft_free:
            chosen = [i for i, k in enumerate(ks) if k]
            drafted = self.proposer.propose([reqs[i] for i in chosen], [ks[i] for i in chosen])
            for i, d in zip(chosen, drafted):
                proposals[i] = self._grammar_cut(reqs[i], d)
        drafts = {c: proposals[i][: ks[i]] for i, c in enumerate(cands)}
        for c in cands:
            if not drafts[c]:
                self.kv.trim(c.req, len(c.req.tokens))  # pages taken for drafts that did not come
                self.policy.idle(c.req)
            elif c.req.generator is not None and not c.req.params.greedy:
                self._saved[c.req] = c.req.generator.get_state()
        return ScheduleBatch([Chunk(c.req, c.start, c.length, drafts[c]) if drafts.get(c) else c
                              for c in batch.chunks])

    def _limit(self, r: Request) -> int:
        """Drafts `r` may take: within k, its max_new_tokens (the last row's token is the
        target's own) and the context (every draft's position exists)."""
        return max(0, min(self.k, r.remaining_new - 1, self.max_model_len - len(r.tokens) - 1))

    @staticmethod
    def _grammar_cut(r: Request, drafts: tuple[int, ...]) -> tuple[int, ...]:
        return drafts[: r.grammar.valid_prefix(drafts)] if r.grammar is not None and drafts else drafts

    def _fit(self, reqs: list[Request], ks: list[int], budget: int) -> list[int]:
        """Each k within the chunk budget and the free pages; the pages are taken."""
        ps, out = self.kv.page_size, []
        for r, k in zip(reqs, ks):
            room = (len(r.pages) + self.kv.allocator.num_free) * ps - len(r.tokens)
            k = max(0, min(k, budget, room))
            if k:
                assert self.kv.ensure_pages(r, len(r.tokens) + k)
            budget -= k
            out.append(k)
        return out

    def _rate(self) -> float:
        s = self._stats
        return s.accepted_tokens / s.draft_tokens if s.draft_tokens >= MIN_DRAFTS_FOR_RATE else 0.5

    # ---- after sampling ---------------------------------------------------------------------
    def verify(self, rows: list[Row], logits: torch.Tensor, sample_rows: list[SampleRow], result: SampleResult,
               accept: Accept) -> None:
        if self._started is not None:
            t0, n = self._started
            self.cost.observe(n, time.perf_counter() - t0)
            self._started = None
        i = 0
        while i < len(rows):
            c = rows[i][0]
            if c.drafts:
                self.proposer.resample(c, i, logits, sample_rows, result)
                self._settle(c, self._accept_rows(c, i, result, accept))
            else:
                accept(c.req, i, result)
            i += len(c.drafts) + 1

    @staticmethod
    def _accept_rows(c: Chunk, first: int, result: SampleResult, accept: Accept) -> int:
        """Accept the chunk's rows in order (module docstring); how many tokens went in."""
        for j in range(len(c.drafts) + 1):
            if accept(c.req, first + j, result) or j == len(c.drafts) or result.token_ids[first + j] != c.drafts[j]:
                return j + 1
        raise AssertionError("unreachable")

    def _settle(self, c: Chunk, emitted: int) -> None:
        """Roll the chunk back to its `emitted` accepted tokens; count them."""
        r, k = c.req, len(c.drafts)
        matched = emitted if emitted <= k and r.output_ids[-1] == c.drafts[emitted - 1] else emitted - 1
        r.num_computed = c.end + emitted - 1
        state = self._saved.pop(r, None)
        if state is not None and r.generator is not None:
            r.generator.set_state(state)
            for _ in range(emitted):
                skip_draw(r.params, r.generator, self.vocab_size)
        if not r.finished:
            self.kv.trim(r, len(r.tokens))
        r.spec_verify_ct += 1
        r.spec_accepted += matched
        s = self._stats
        s.verify_calls += 1
        s.draft_tokens += k
        s.accepted_tokens += matched
        s.accept_lengths[emitted - 1] += 1
        self.policy.observe(r, k, matched)

    def release(self, req: Request) -> None:
        self._saved.pop(req, None)
        self.policy.release(req)
        self.proposer.release(req)
