"""The scheduler → runner contract: which tokens of which requests the next forward computes.

A decode chunk may also carry draft tokens (speculative decoding, engine/speculate.py): the
forward computes them after the chunk's own tokens and samples a row for each position, so one
forward verifies them all. Its rows, for a request at position 9 with drafts x y:

    ids        [ t9   x    y  ]         t9 = tokens[9], the chunk's own (last) token
    positions  [  9   10   11 ]
    rows (j)      0    1    2           row j: the target's token after tokens[:10] + drafts[:j]
                                        (accepted while it equals drafts[j]; row 2 is the bonus)
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import Request


@dataclass(frozen=True)
class Chunk:
    """Compute `tokens[start:start+length]` of `req`, then `drafts`; sample a token if that
    reaches the end (one per draft more: see the module docstring)."""

    req: Request
    start: int
    length: int
    drafts: tuple[int, ...] = ()  # proposed tokens after tokens[:end]; only on a chunk that samples

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def span(self) -> int:
        """Rows this chunk puts in the forward: its tokens and its drafts."""
        return self.length + len(self.drafts)

    @property
    def samples(self) -> bool:
        return self.end == len(self.req.tokens)


Row = tuple[Chunk, int]  # a sampled row: its chunk and j, the drafts before it (0 without speculation)


@dataclass(frozen=True)
class ScheduleBatch:
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.span for c in self.chunks)
