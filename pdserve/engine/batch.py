"""The scheduler → runner contract: which tokens of which requests the next forward computes."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import Request


@dataclass(frozen=True)
class Chunk:
    """Compute `tokens[start:start+length]` of `req`; sample a token if that reaches the end."""

    req: Request
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def samples(self) -> bool:
        return self.end == len(self.req.tokens)


@dataclass(frozen=True)
class ScheduleBatch:
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)
