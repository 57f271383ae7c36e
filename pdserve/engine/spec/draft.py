"""A draft model proposes (SGLang's STANDALONE, vLLM's draft_model): a smaller model with the
target's tokenizer, its own paged KV pool numbered like the target's (one page table serves
both), its own runner (on rank 0 only under TP: the plan carries the drafts to the others).

  propose(reqs, ks), once per step for the requests the adaptive rule gave k > 0:
    catch up   the draft's KV of each request is valid up to `ledger.valid` (draft_kv.py): a new
               request (or one whose prompt arrived by a PD transfer, or that was preempted) has
               none, one whose k drafts were all accepted lags by one token; the first forward
               computes tokens[valid:] of every request (a long catch-up goes by chunk_budget
               tokens a step, without drafts) and samples its last row -> d0
    draft      forwards 2..k: each request's previous draft at the next position -> d1 .. dk-1
    sampling   greedy requests: argmax of the draft's logits (after the request's penalties and
               its grammar's mask); sampled: d ~ q = the draft's distribution processed exactly
               as the target's will be (temperature, top-k/p/min-p, penalties with the drafts
               before it), q kept for the rejection rule
  resample(chunk, ...) before acceptance, sampled requests only (greedy ones: exact match): the
    speculative sampling rule (`rejection_tokens`) rewrites the rows' tokens: accept d_j with
    probability min(1, p_j(d_j) / q_j(d_j)); the first refused row draws from
    norm(max(p_j - q_j, 0)) and ends the chunk; all accepted: the last row's own (~ p_k) is the
    bonus. The output is distributed as the target's, whatever the draft.
A seeded request drafts and decides with its own generator seeded from its seed (its target
generator's draws stay those of plain decoding); an unseeded one uses the global one.

Under PD the decode prefills the draft itself (the first proposal's catch-up), chosen over moving
the draft's KV with the target's: see engine/spec/build.py for the measured cost.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.engine.batch import Chunk
from pdserve.engine.grammar import Grammars
from pdserve.engine.kv_cache import Pool, new_pool
from pdserve.engine.kv_manager import KVManager
from pdserve.engine.messages import StepPlan
from pdserve.engine.request import Request
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import SampleResult, SampleRow, process_logits
from pdserve.engine.spec.adaptive import StepCost
from pdserve.engine.spec.draft_kv import DraftLedger
from pdserve.engine.stop import StopChecker
from pdserve.model.config import ModelConfig
from pdserve.model.loader import load_model

log = logging.getLogger(__name__)

SEED_SALT = 0x5DEECE66D  # a seeded request's draft generator: its seed xor this


def rejection_tokens(p: torch.Tensor, q: torch.Tensor, drafts: tuple[int, ...], bonus: int,
                     gen: torch.Generator | None) -> list[int]:
    """The rows' tokens under the speculative sampling rule (module docstring): p [k+1, V] the
    target's distributions, q [k, V] the draft's, `bonus` a token drawn from p[k]."""
    u = torch.rand(len(drafts), generator=gen, device=p.device).tolist()
    out: list[int] = []
    for j, d in enumerate(drafts):
        pj, qj = float(p[j, d]), float(q[j, d])
        if qj > 0 and u[j] * qj < pj:
            out.append(d)
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        residual[d] = 0.0  # refused: never d again (p <= q elsewhere leaves only rounding)
        if float(residual.sum()) <= 0:
            residual = p[j].clone()
            residual[d] = 0.0
        out.append(int(torch.multinomial(residual, 1, generator=gen)))
        return out
    return [*out, bonus]


class DraftProposer:
    name = "draft_model"
    draft_free = False

    def __init__(self, runner: ModelRunner, kv: KVManager, stops: StopChecker, grammars: Grammars,
                 cost: StepCost, chunk_budget: int, vocab_size: int) -> None:
        self.runner, self.kv, self.stops, self.grammars = runner, kv, stops, grammars
        self.cost, self.chunk_budget, self.vocab_size = cost, chunk_budget, vocab_size
        self.ledger = DraftLedger(kv.page_size)
        self._q: dict[Request, list[torch.Tensor]] = {}  # this step's draft distributions (sampled requests)
        self._gens: dict[Request, torch.Generator | None] = {}

    @classmethod
    def load(cls, path: str, target: ModelConfig, kv: KVManager, num_pages: int, device: torch.device,
             dtype: torch.dtype, max_model_len: int, cpu_prepack: bool, stops: StopChecker, grammars: Grammars,
             cost: StepCost, chunk_budget: int) -> DraftProposer:
        """The draft model from `path` and a pool of `num_pages` (the target pool's) pages."""
        from pdserve.model.bundled import resolve_model

        folder = resolve_model(path)
        cfg = ModelConfig.from_folder(folder)
        if cfg.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({cfg.vocab_size} tokens) is not the target's "
                             f"({target.vocab_size}): it needs the same tokenizer")
        t0 = time.perf_counter()
        model = load_model(folder, device, dtype, max_model_len + 1, cpu_prepack=cpu_prepack)
        pool: Pool = new_pool(cfg, num_pages, kv.page_size, device, dtype)
        log.info("draft model %s loaded in %.1f s (%d layers, hidden %d; KV pool %.2f GB)", folder.name,
                 time.perf_counter() - t0, cfg.num_hidden_layers, cfg.hidden_size,
                 num_pages * pool.page_bytes() / 2**30)
        return cls(ModelRunner(model, pool, device), kv, stops, grammars, cost, chunk_budget, target.vocab_size)

    # ---- proposing ----------------------------------------------------------------------------
    def propose(self, reqs: list[Request], ks: list[int]) -> list[tuple[int, ...]]:
        self._q.clear()
        out: list[list[int]] = [[] for _ in reqs]
        first: list[int] = []  # requests whose catch-up reaches their last token: they draft
        spans: list[tuple[list[int], int, int]] = []
        ids: list[int] = []
        rows: list[int] = []
        budget = self.chunk_budget
        for i, r in enumerate(reqs):
            n = len(r.tokens)
            start = self.ledger.valid(r, n - 1)
            end = min(n, start + budget)
            if end <= start:
                continue
            spans.append((r.pages, start, end - start))
            ids.extend(r.tokens[start:end])
            budget -= end - start
            self.ledger.wrote(r, [], start, end)
            if end == n:
                rows.append(len(ids) - 1)
                first.append(i)
        if spans:
            logits = self._run(StepPlan(ids, [p for _, s, m in spans for p in range(s, s + m)], spans, rows))
            if logits is not None:
                self._pick([reqs[i] for i in first], logits, [out[i] for i in first])
        for j in range(1, max((ks[i] for i in first), default=0)):
            live = [i for i in first if ks[i] > j]
            plan = StepPlan([out[i][-1] for i in live], [len(reqs[i].tokens) + j - 1 for i in live],
                            [(reqs[i].pages, len(reqs[i].tokens) + j - 1, 1) for i in live], list(range(len(live))))
            logits = self._run(plan)
            assert logits is not None
            for i in live:
                n = len(reqs[i].tokens)
                self.ledger.wrote(reqs[i], out[i], n + j - 1, n + j)
            self._pick([reqs[i] for i in live], logits, [out[i] for i in live])
        return [tuple(o) for o in out]

    def _run(self, plan: StepPlan) -> torch.Tensor | None:
        t0 = time.perf_counter()
        logits, _ = self.runner.run(plan)
        self.cost.observe(len(plan.input_ids), time.perf_counter() - t0)
        return None if logits is None else logits[:, : self.vocab_size]

    def _pick(self, reqs: list[Request], logits: torch.Tensor, outs: list[list[int]]) -> None:
        """Each request's next draft from the draft's logits (module docstring), after its drafts so far."""
        states = [r.grammar for r in reqs]
        if any(s is not None for s in states):
            self.grammars.mask(logits, states, [tuple(o) for o in outs])
        rows = [SampleRow(r.params, None, r.tokens[: r.prompt_len], r.output_ids + o, self.stops.suppressed(r, len(o)))
                for r, o in zip(reqs, outs)]
        x = process_logits(logits, rows)
        for k, (r, o) in enumerate(zip(reqs, outs)):
            if r.params.greedy:
                o.append(int(x[k].argmax()))
                continue
            q = x[k].softmax(-1)
            o.append(int(torch.multinomial(q, 1, generator=self._gen(r))))
            self._q.setdefault(r, []).append(q)

    def _gen(self, r: Request) -> torch.Generator | None:
        if r not in self._gens:
            self._gens[r] = None if r.params.seed is None else \
                torch.Generator(device=self.runner.device).manual_seed((r.params.seed ^ SEED_SALT) & (2**63 - 1))
        return self._gens[r]

    # ---- verifying ----------------------------------------------------------------------------
    def resample(self, c: Chunk, first: int, logits: torch.Tensor, rows: list[SampleRow],
                 result: SampleResult) -> None:
        qs = self._q.get(c.req)
        if qs is None or c.req.params.greedy:
            return
        k = len(c.drafts)
        block = logits[first:first + k + 1, : self.vocab_size].float()
        p = process_logits(block, rows[first:first + k + 1]).softmax(-1)
        tokens = rejection_tokens(p, torch.stack(qs[:k]), c.drafts, result.token_ids[first + k], self._gen(c.req))
        raw = block.log_softmax(-1) if result.logprobs is not None else None
        for j, t in enumerate(tokens):
            result.token_ids[first + j] = t
            if raw is not None and result.logprobs is not None:
                result.logprobs[first + j] = float(raw[j, t])

    def release(self, req: Request) -> None:
        self._q.pop(req, None)
        self._gens.pop(req, None)
        self.ledger.release(req)
