"""Model runner: turns a ScheduleBatch into one batched forward and the logits to sample.

Flat batch layout for chunks A (prefill 0..4), B (decode at 9), C (prefill chunk 16..19):

    input_ids  [a0 a1 a2 a3 | b9 | c16 c17 c18]
    positions  [ 0  1  2  3 |  9 |  16  17  18]
    sampled rows: 3 (A ends its prompt), 4 (B); C's chunk does not reach its end.
Logits are computed only for sampled rows, and for the prompt rows of requests that score
their prompt (`Request.prompt_lp`): row at position p predicts prompt token p + 1, so a chunk
start..end scores tokens max(start, from)+1 .. min(end, prompt_len - 1) (A with from = 0:
rows 0..2 score a1..a3; its last row, 3, is the sampled one).
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import PagedAttention, build_metadata
from pdserve.engine.batch import Chunk, ScheduleBatch
from pdserve.engine.kv_cache import KVPool
from pdserve.model.llama import LlamaForCausalLM

PromptRows = list[tuple[Chunk, range, torch.Tensor]]  # chunk, positions p scored, logits [len, V]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch) -> tuple[torch.Tensor | None, list[Chunk], PromptRows]:
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Chunk] = []
        for c in batch.chunks:
            ids.extend(c.req.tokens[c.start:c.end])
            positions.extend(range(c.start, c.end))
            if c.samples:
                sample_rows.append(len(ids) - 1)
                sampled.append(c)
        meta = build_metadata([(c.req.pages, c.start, c.length) for c in batch.chunks], self.pool.page_size, self.device)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            PagedAttention(self.pool, meta),
        )
        prompt_rows: PromptRows = []
        offset = 0
        for c in batch.chunks:
            r = c.req
            if r.prompt_lp is not None:
                lo, hi = max(c.start, r.prompt_lp_from - 1, 0), min(c.end, r.prompt_len - 1)
                if lo < hi:
                    part = hidden[offset + lo - c.start: offset + hi - c.start]
                    prompt_rows.append((c, range(lo, hi), self.model.logits(part)))
            offset += c.length
        if not sampled:
            return None, sampled, prompt_rows
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden.index_select(0, rows)), sampled, prompt_rows
