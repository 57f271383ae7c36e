"""The seam where speculative decoding plugs into the engine step (no proposer is built yet).

Around each forward (Engine._forward):

    speculator.propose(batch)        before the forward: it may give decode chunks draft tokens
                                     (n-gram, suffix, a draft model), so that one forward
                                     computes them all
    ... forward, grammar masks, sample (one sampled row per position that verifies) ...
    for chunk, rows in speculator.verify(sampled, result):
        each row's token in turn goes through accept_token (engine/accept.py) until the request
        finishes; rows past the first refused draft are not listed (their KV rolls back)

NoSpeculation (the default, engine/build.py): proposes nothing; every sampled chunk accepts its
one sampled row, which is plain decoding.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.engine.batch import Chunk, ScheduleBatch
from pdserve.engine.sampler import SampleResult


class Speculator(Protocol):
    def propose(self, batch: ScheduleBatch) -> None:
        """Before the forward: add draft tokens to decode chunks (or nothing)."""
        ...

    def verify(self, sampled: list[Chunk], result: SampleResult) -> list[tuple[Chunk, list[int]]]:
        """After sampling: per sampled chunk, the rows of `result` whose tokens it accepts, in order."""
        ...


class NoSpeculation:
    """Plain decoding: no drafts; each sampled chunk accepts its own row."""

    def propose(self, batch: ScheduleBatch) -> None:
        pass

    def verify(self, sampled: list[Chunk], result: SampleResult) -> list[tuple[Chunk, list[int]]]:
        return [(c, [i]) for i, c in enumerate(sampled)]
