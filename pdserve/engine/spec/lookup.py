"""Draft-free proposers' matching, and the n-gram proposer (prompt lookup: SGLang's NGRAM,
vLLM's ngram).

`longest_match(seq, ctx, max_len)` finds where the context's suffix occurs in `seq`: the
occurrences of its last token, narrowed one token back at a time while any still matches
(numpy over the whole sequence, no index to keep: a few vector compares per step):

    ctx  ... a  b  c | <- the suffix looked up (c last)
    seq  x a b c d e  y b c f   c g
             ^ ends here:       ^ (b c):  ^ (c):
             match 3, next d    match 2   match 1
    -> length 3, ends [3]; a proposal continues from seq[4] (d e ...)

NGRAM: the context is the request's own prompt + output; the longest suffix of length in
[min, max] that occurred before (not the suffix itself) proposes the tokens that followed its
latest occurrence (where it runs into the end, the repeat goes on with the same period: a loop
"x y x y" proposes "x y x y ..."). Cost: no state between steps; np.asarray of the tokens,
O(len x max) compares.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.batch import Chunk
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult, SampleRow


def as_array(tokens: Sequence[int]) -> np.ndarray:
    return np.fromiter(tokens, dtype=np.int64, count=len(tokens))


def longest_match(seq: np.ndarray, ctx: np.ndarray, max_len: int, stop: int | None = None) -> tuple[int, np.ndarray]:
    """(length, ends): the longest suffix of `ctx` (at most `max_len` tokens) found in `seq` as
    seq[e - length + 1 : e + 1] for each e in `ends` (ascending), e < stop (default len(seq) - 1:
    a token follows every occurrence). (0, empty) when ctx's last token never occurs there."""
    stop = len(seq) - 1 if stop is None else min(stop, len(seq) - 1)
    if stop < 1 or len(ctx) == 0:
        return 0, np.empty(0, dtype=np.int64)
    ends = np.flatnonzero(seq[:stop] == ctx[-1])
    length = 1 if len(ends) else 0
    while len(ends) and length < min(max_len, len(ctx)):
        back = ends - length
        ok = back >= 0
        ok[ok] = seq[back[ok]] == ctx[-1 - length]
        if not ok.any():
            break
        ends = ends[ok]
        length += 1
    return length, ends


class DraftFree:
    """What n-gram and suffix share as proposers: free proposals, verified by exact match (the
    rejection rule of a point-mass draft: engine/spec/speculator.py)."""

    draft_free = True

    def resample(self, c: Chunk, first: int, logits: torch.Tensor, rows: list[SampleRow],
                 result: SampleResult) -> None:
        pass

    def release(self, req: Request) -> None:
        pass


class NgramProposer(DraftFree):
    """Prompt lookup over the request's own tokens (module docstring)."""

    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, reqs: list[Request], limits: list[int]) -> list[tuple[int, ...]]:
        """Up to `limits[i]` drafts for each request (empty: no match)."""
        return [self.lookup(r.tokens, k) for r, k in zip(reqs, limits)]

    def lookup(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        if k <= 0 or len(tokens) < 2:
            return ()
        seq = as_array(tokens)
        n, ends = longest_match(seq, seq, self.max_n)  # ends before the last token: not itself
        if n < self.min_n:
            return ()
        e = int(ends[-1])  # the latest occurrence: where the text repeats now
        out = [int(t) for t in seq[e + 1: e + 1 + k]]
        period = len(seq) - 1 - e  # past the end the text goes on repeating with this period
        while len(out) < k:
            out.append(out[len(out) - period])
        return tuple(out)
