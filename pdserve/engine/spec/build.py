"""Build the speculator an EngineConfig asks for (engine/build.py calls `build_speculator`).

    off, or a PD prefill server    NoSpeculation (a prefill hands its requests off after the
                                   first token: there is nothing to speculate on)
    NGRAM                          lookup.NgramProposer
    SUFFIX                         suffix.SuffixProposer
    STANDALONE                     draft.DraftProposer: the draft model, its own KV pool with the
                                   target's page numbering, its runner (rank 0 only under TP)
    then the cost model: start-up probes of the target (and the draft) forward, unless DP
    attention (a forward there is a collective round with the other ranks: online timing only)

Probes: B decode rows, then B verify chunks of k + 1 rows, for B = 1, 4, 16, 32, at context
PROBE_CONTEXT (less where the pool is small), each twice; their pages are borrowed from the free
list and given back (what the probes wrote there is never read: a page's next owner writes
before it reads).

A draft model under PD: the decode prefills the draft's prompt KV itself (its first proposal's
catch-up, chunk_budget tokens a step), rather than the prefill computing it and moving it with
the target's. The draft's compute is the same either way (L_draft / L_target of the target's
prefill: 8 / 30 layers = 27% for the benchmark's draft); moving it would add the same share to
the transfer (the bundled model's KV is 46 KB a token, an 8-layer draft's 12 KB: 12 MB for a
1000-token prompt, ~5 ms at tcp's measured 2.7 GB/s) and make the prefill load and run the draft,
lengthening every TTFT, and tie the prefill's pool layout to a draft the prefill does not use.
On the decode the catch-up delays only that request's first drafts (it decodes plainly until
the draft has caught up) and any other request's step by at most a chunk of draft layers.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.grammar import Grammars
from pdserve.engine.kv_cache import pages_needed
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import StepPlan
from pdserve.engine.runner import ModelRunner
from pdserve.engine.spec.adaptive import AdaptivePolicy, StepCost
from pdserve.engine.spec.config import SpecConfig
from pdserve.engine.spec.lookup import NgramProposer
from pdserve.engine.spec.speculator import Proposer, SpecDecoding
from pdserve.engine.spec.suffix import SuffixProposer
from pdserve.engine.speculate import NoSpeculation
from pdserve.engine.stop import StopChecker
from pdserve.model.config import ModelConfig

log = logging.getLogger(__name__)

PROBE_BATCHES = (1, 4, 16, 32)
PROBE_CONTEXT = 256


def build_speculator(spec: SpecConfig, mode: str, kv: KVManager, runner: ModelRunner, target: ModelConfig,
                     stops: StopChecker, grammars: Grammars, chunk_budget: int, max_model_len: int, probe: bool,
                     dtype: torch.dtype, cpu_prepack: bool) -> SpecDecoding | NoSpeculation:
    """The speculator for `spec` (see the module docstring); `probe`: time forwards at start-up."""
    spec = spec.resolved()
    spec.check()
    if spec.algorithm is None:
        return NoSpeculation()
    if mode == "prefill":
        log.info("speculative decoding is for decoding: a PD prefill server runs without it")
        return NoSpeculation()
    draft_cost = None
    proposer: Proposer
    if spec.algorithm == "NGRAM":
        proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
    elif spec.algorithm == "SUFFIX":
        proposer = SuffixProposer(spec.suffix_max_depth, spec.suffix_max_cached_requests,
                                  spec.suffix_max_spec_factor, spec.suffix_min_token_prob)
    else:
        from pdserve.engine.spec.draft import DraftProposer

        assert spec.draft_model_path is not None
        draft_cost = StepCost()
        proposer = DraftProposer.load(spec.draft_model_path, target, kv, runner.pool.num_pages, runner.device, dtype,
                                      max_model_len, cpu_prepack, stops, grammars, draft_cost, chunk_budget)
    cost = StepCost()
    k = spec.num_draft_tokens
    if probe and spec.adaptive:
        probe_costs(runner, kv, cost, k)
        if draft_cost is not None:
            from pdserve.engine.spec.draft import DraftProposer

            assert isinstance(proposer, DraftProposer)
            probe_costs(proposer.runner, kv, draft_cost, 0)
    policy = AdaptivePolicy(cost, draft_cost, enabled=spec.adaptive)
    log.info("speculative decoding: %s, up to %d drafts per request and step%s", proposer.name, k,
             ", adaptive" if spec.adaptive else "")
    return SpecDecoding(proposer, policy, cost, kv, k, spec.disable_by_batch_size, chunk_budget, max_model_len,
                      target.vocab_size)


def probe_costs(runner: ModelRunner, kv: KVManager, cost: StepCost, k: int) -> None:
    """Time plain decode batches and (k > 0) verify batches into `cost` (module docstring)."""
    ps = kv.page_size
    for b in PROBE_BATCHES:
        per_seq = min(pages_needed(PROBE_CONTEXT + k + 1, ps), kv.allocator.num_free // b)
        context = per_seq * ps - k - 1
        if context < ps:
            break
        pages = kv.allocator.alloc(b * per_seq)
        try:
            tables = [pages[i * per_seq:(i + 1) * per_seq] for i in range(b)]
            for rows in sorted({1, k + 1}):
                plan = _plan(tables, context, rows)
                for _ in range(2):
                    cost.observe(len(plan.input_ids), runner.time_plan(plan))
        finally:
            kv.allocator.free(pages)


def _plan(tables: list[list[int]], context: int, rows: int) -> StepPlan:
    """Each table's sequence computes `rows` tokens at position `context` and samples each."""
    n = len(tables) * rows
    return StepPlan([1] * n, [context + j for _ in tables for j in range(rows)],
                    [(t, context, rows) for t in tables], list(range(n)))
