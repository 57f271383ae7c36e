"""Model runner: turns a ScheduleBatch into one batched forward and the logits to sample.

Flat batch layout for chunks A (prefill 0..4), B (decode at 9), C (prefill chunk 16..19),
D (decode at 5 verifying drafts x y, engine/batch.py):

    input_ids  [a0 a1 a2 a3 | b9 | c16 c17 c18 | d5  x  y]
    positions  [ 0  1  2  3 |  9 |  16  17  18 |  5  6  7]
    sampled rows: 3 (A ends its prompt), 4 (B), 8 9 10 (D: after d5, after x, after y);
    C's chunk does not reach its end.
Logits are computed only for sampled rows, and for the prompt rows of requests that score
their prompt (`Request.prompt_lp`): row at position p predicts prompt token p + 1, so a chunk
start..end scores tokens max(start, from)+1 .. min(end, prompt_len - 1) (A with from = 0:
rows 0..2 score a1..a3; its last row, 3, is the sampled one).

The layout is a StepPlan: with tensor parallelism rank 0 publishes each plan to the other
ranks (engine/tp_worker.py), and every rank runs the same plan on its slice of the model
(the logits are collective, so every rank computes the same rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pdserve.engine.attention import PagedAttention, build_metadata, decode_in_place
from pdserve.engine.batch import Chunk, Row, ScheduleBatch
from pdserve.engine.kv_cache import Pool
from pdserve.engine.messages import StepPlan
from pdserve.model.llama import LlamaForCausalLM

PromptRows = list[tuple[Chunk, range, torch.Tensor]]  # chunk, positions p scored, logits [len, V]


def plan_step(batch: ScheduleBatch) -> tuple[StepPlan, list[Row], list[tuple[Chunk, range]]]:
    """The plan, the sampled rows (in sample_rows order: a chunk's drafts add rows), the chunks
    that score prompt positions (in score_spans order)."""
    ids: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    sampled: list[Row] = []
    score_spans: list[tuple[int, int]] = []
    scored: list[tuple[Chunk, range]] = []
    for c in batch.chunks:
        offset = len(ids)
        ids.extend(c.req.tokens[c.start:c.end])
        ids.extend(c.drafts)
        positions.extend(range(c.start, c.start + c.span))
        if c.samples:
            last = offset + c.length - 1
            sample_rows.extend(range(last, last + len(c.drafts) + 1))
            sampled.extend((c, j) for j in range(len(c.drafts) + 1))
        r = c.req
        if r.prompt_lp is not None:
            lo, hi = max(c.start, r.prompt_lp_from - 1, 0), min(c.end, r.prompt_len - 1)
            if lo < hi:
                score_spans.append((offset + lo - c.start, offset + hi - c.start))
                scored.append((c, range(lo, hi)))
    spans = [(c.req.pages, c.start, c.span) for c in batch.chunks]
    return StepPlan(ids, positions, spans, sample_rows, score_spans), sampled, scored


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: Pool, device: torch.device,
                 publish: Callable[[StepPlan], None] | None = None, attention_backend: str = "auto") -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.publish = publish  # tensor parallelism: send the plan to the other ranks
        self.in_place = decode_in_place(attention_backend, pool)  # decode attention reads pages in place

    def forward(self, batch: ScheduleBatch) -> tuple[torch.Tensor | None, list[Row], PromptRows]:
        plan, sampled, scored = plan_step(batch)
        if self.publish is not None:
            self.publish(plan)
        logits, scores = self.run(plan)
        prompt_rows = [(c, rng, s) for (c, rng), s in zip(scored, scores) if s is not None]
        return logits, sampled, prompt_rows

    def time_plan(self, plan: StepPlan) -> float:
        """Seconds of one forward of `plan`, published to the other tp ranks like any (the
        speculator's start-up cost probes)."""
        t0 = time.perf_counter()
        if self.publish is not None:
            self.publish(plan)
        self.run(plan)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The forward of `plan`: the sampled rows' logits (None when none samples) and each
        score span's logits (None on tp ranks other than 0)."""
        meta = build_metadata(plan.spans, self.pool.page_size, self.device, self.in_place)
        hidden = self.model(
            torch.tensor(plan.input_ids, dtype=torch.long, device=self.device),
            torch.tensor(plan.positions, dtype=torch.long, device=self.device),
            PagedAttention(self.pool, meta),
        )
        scores = [self.model.logits(hidden[a:b]) for a, b in plan.score_spans]
        if not plan.sample_rows:
            return None, scores
        rows = torch.tensor(plan.sample_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden.index_select(0, rows)), scores
