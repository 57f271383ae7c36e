"""The seam where speculative decoding plugs into the engine step.

Around each forward (Engine._forward):

    batch = speculator.propose(batch)     before the forward: decode chunks may get draft tokens
                                          (n-gram, suffix, a draft model: engine/spec/), so that
                                          one forward computes them all (engine/batch.py's rows)
    ... forward; each sampled row's grammar mask and sampling state see the drafts before it
        (row j of a chunk: its output so far + drafts[:j]), exactly as if they had come one by one ...
    speculator.verify(rows, logits, sample_rows, result, accept)
                                          per chunk, each accepted row's token goes through
                                          `accept(req, row, result)` (the engine's accept_token
                                          path) in order, until a draft is refused or the request
                                          finishes; the speculator then rolls the chunk back to
                                          what was accepted (num_computed, pages, generators)
    speculator.release(req)               the request left the engine (finished or aborted)

NoSpeculation (the default, engine/build.py): proposes nothing; every sampled row is accepted,
which is plain decoding. engine/spec/speculator.py is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pdserve.engine.batch import Row, ScheduleBatch
from pdserve.engine.messages import SpecStats
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult, SampleRow

Accept = Callable[[Request, int, SampleResult], bool]  # (request, row, result) -> the request finished


class Speculator(Protocol):
    def propose(self, batch: ScheduleBatch) -> ScheduleBatch:
        """Before the forward: the batch, its decode chunks with draft tokens (or as it is)."""
        ...

    def verify(self, rows: list[Row], logits: torch.Tensor, sample_rows: list[SampleRow], result: SampleResult,
               accept: Accept) -> None:
        """After sampling (`sample_rows`: what the sampler got per row): accept each chunk's verified
        rows in order (see the module docstring)."""
        ...

    def release(self, req: Request) -> None:
        """`req` left the engine: forget what was kept for it."""
        ...

    @property
    def stats(self) -> SpecStats | None:
        """Cumulative counts for /metrics (None: no speculation)."""
        ...


class NoSpeculation:
    """Plain decoding: no drafts; each sampled row is accepted."""

    stats: SpecStats | None = None

    def propose(self, batch: ScheduleBatch) -> ScheduleBatch:
        return batch

    def verify(self, rows: list[Row], logits: torch.Tensor, sample_rows: list[SampleRow], result: SampleResult,
               accept: Accept) -> None:
        for i, (c, _) in enumerate(rows):
            accept(c.req, i, result)

    def release(self, req: Request) -> None:
        pass
