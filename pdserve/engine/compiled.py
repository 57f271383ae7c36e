"""Decode steps without Python between ops: the decode forward compiled by torch.compile.

Lifecycle: the runner builds a `CompiledDecode` at start-up when compile is on (the default;
`--disable-compile` turns it off) and the setup allows it (CPU, float32, the C++ kernels of
engine/kernels loaded, one attention rank: no collectives in the graph). `warm()` compiles
its two batch-size buckets right there, so no request pays for it:

    bucket 1       batch 1, static shapes
    bucket 2..N    any batch of 2..N rows (N = --max-running): the batch dim is symbolic

Every decode-only step (single-token rows, no prompt scoring) of at most N rows then runs one
compiled graph: embedding, 30 x (norm, GEMMs through `pdserve_model::packed_linear`, RoPE, KV
write + paged attention through `pdserve::kv_write` / `pdserve::paged_decode`, MLP) and the LM
head, with inductor's C++ kernels fusing the element-wise glue. Prefill chunks, mixed steps and
larger batches run eager (model/llama.py as is). The page table's width (pages of the longest
row) is symbolic too, so a growing context never recompiles.

Compiled code is cached on disk by inductor (`<cache_dir>/inductor`): a second start with the
same model and pool size skips most of the compile (dynamo still traces: ~5-10 s per bucket
here). Padding: a page table narrower than 2 pages gets a pad page 0 (width 1 would be
specialised by dynamo and compile a third graph).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from pdserve.engine.attention import PART_TOKENS, build_metadata
from pdserve.engine.kv_cache import KVPool
from pdserve.engine.messages import StepPlan
from pdserve.model.bundled import cache_dir
from pdserve.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DIM_MAX = 1 << 30  # upper bound of the symbolic sizes (dynamo wants one)


class DecodeAttention:
    """The model's `attn(layer, q, k, v)` inside the graph: write the new rows, attend in place."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, page_size: int, slots: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor) -> None:
        self.k, self.v, self.page_size = k, v, page_size
        self.slots, self.table, self.lens = slots, table, lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.ops.pdserve.kv_write(self.k, self.v, layer, self.slots, k, v)  # mutates the pool (an input)
        return torch.ops.pdserve.paged_decode(q, self.k, self.v, layer, self.table, self.lens, self.page_size,
                                              q.shape[-1] ** -0.5, PART_TOKENS)


def decode_forward(model: LlamaForCausalLM, k: torch.Tensor, v: torch.Tensor, page_size: int, ids: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor,
                   lens: torch.Tensor) -> torch.Tensor:
    """The logits of a decode-only batch: what `_GRAPH` compiles. The model, the pool and every
    packed weight's key are inputs, so engines of one model in a process share the graphs."""
    hidden = model(ids, positions, DecodeAttention(k, v, page_size, slots, table, lens))
    logits = model.logits(hidden)
    assert logits is not None  # one rank: the whole vocabulary
    return logits


_GRAPH = torch.compile(decode_forward, fullgraph=True)


class CompiledDecode:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, max_batch: int) -> None:
        self.model, self.pool, self.max_batch = model, pool, max_batch
        self.steps = 0  # decode steps run compiled (tests and the stats read it)
        os.environ.setdefault(CACHE_ENV, str(cache_dir() / "inductor"))
        for t in (pool.k, pool.v):  # any pool size (--num-pages) and context length reuse the graphs
            torch._dynamo.mark_dynamic(t, 1, min=2, max=DIM_MAX)
        for t in (model.rope.cos, model.rope.sin):
            torch._dynamo.mark_dynamic(t, 0, min=2, max=DIM_MAX)

    def fits(self, plan: StepPlan) -> bool:
        return (0 < len(plan.spans) <= self.max_batch and not plan.score_spans
                and len(plan.sample_rows) == len(plan.spans) and all(length == 1 for _, _, length in plan.spans))

    def run(self, plan: StepPlan) -> torch.Tensor:
        """The logits of every row of a decode-only `plan` (fits), in row order."""
        meta = build_metadata(plan.spans, self.pool.page_size, self.pool.k.device, in_place=True)
        rows = meta.decode_rows
        assert rows is not None
        table = rows.page_table
        if table.shape[1] < 2:
            table = torch.nn.functional.pad(table, (0, 2 - table.shape[1]))
        ids = torch.tensor(plan.input_ids, dtype=torch.long)
        positions = torch.tensor(plan.positions, dtype=torch.long)
        args = (ids, positions, meta.slots, table, rows.seq_lens)
        if len(ids) > 1:
            for t in args:
                torch._dynamo.mark_dynamic(t, 0, min=2, max=DIM_MAX)
        torch._dynamo.mark_dynamic(table, 1, min=2, max=DIM_MAX)
        self.steps += 1
        return _GRAPH(self.model, self.pool.k, self.pool.v, self.pool.page_size, *args)

    @torch.inference_mode()
    def warm(self) -> float:
        """Compile both buckets on throw-away rows (page 0, never handed out, takes their KV).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        for rows in sorted({1, min(2, self.max_batch)}):
            plan = StepPlan([0] * rows, [0] * rows, [([0], 0, 1)] * rows, list(range(rows)), [])
            self.run(plan)
        return time.perf_counter() - t0


def can_compile(model: LlamaForCausalLM, pool: KVPool, in_place: bool) -> bool:
    """The setups the compiled decode covers: CPU, float32, kernels loaded, one attention rank."""
    return (in_place and pool.k.device.type == "cpu" and pool.k.dtype == torch.float32
            and model.tp.attn_size == 1 and not model.tp.dp_attention)
