"""Suffix decoding (vLLM's `suffix`, after Snowflake's SuffixDecoding): drafts from the longest
suffix of the context found in the request's own tokens or in recent requests' outputs, the
continuation chosen by how often each token followed there.

Why not arctic-inference's suffix tree (the package vLLM uses): on PyPI it is a source
distribution only; a plain `pip install` here tries to build it against a fresh torch in an
isolated environment, and its CMake then finds the wrong Python. Built by hand (nanobind 2.9.2,
--no-build-isolation, CMAKE_ARGS=-DPython_EXECUTABLE=...) it runs on this CPU with torch 2.13,
but a dependency that needs a hand build is not one a user can install with pip; this index is
numpy over flat arrays (engine/spec/lookup.py's matcher) and needs nothing.

    corpus  [ out_1 | -1 | out_2 | -1 | ... ]   the last `max_cached_requests` finished outputs
    own     [ prompt + output so far ]          the request itself (its current suffix excluded)

    1. match   the longest context suffix (<= max_depth tokens) in both; keep the occurrences of
               that length (M), in either
    2. walk    at each depth the token that most often follows the surviving occurrences; its
               share multiplies a running probability; stop below min_token_prob, at the limit
               min(k, ceil(max_spec_factor x M)), or where no occurrence goes on; occurrences
               that took another token drop out (the path through the suffix tree with most weight)

A request's output joins the corpus when it finishes (`release`); the oldest leaves it first.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from pdserve.engine.request import Request
from pdserve.engine.spec.lookup import DraftFree, as_array, longest_match

SEPARATOR = -1  # between outputs in the corpus: never a token, so no match or walk crosses it


class SuffixProposer(DraftFree):
    name = "suffix"

    def __init__(self, max_depth: int, max_cached_requests: int, max_spec_factor: float,
                 min_token_prob: float) -> None:
        self.max_depth, self.max_cached = max_depth, max_cached_requests
        self.spec_factor, self.min_prob = max_spec_factor, min_token_prob
        self._outputs: OrderedDict[str, np.ndarray] = OrderedDict()
        self._corpus: np.ndarray | None = None  # rebuilt when the outputs change

    def propose(self, reqs: list[Request], limits: list[int]) -> list[tuple[int, ...]]:
        corpus = self.corpus()
        return [self.lookup(as_array(r.tokens), corpus, k) for r, k in zip(reqs, limits)]

    def lookup(self, own: np.ndarray, corpus: np.ndarray, k: int) -> tuple[int, ...]:
        if k <= 0:
            return ()
        found = [(seq, *longest_match(seq, own, self.max_depth)) for seq in (own, corpus)]
        depth = max(n for _, n, _ in found)
        if depth == 0:
            return ()
        paths = [(seq, ends + 1) for seq, n, ends in found if n == depth]  # where each continuation starts
        limit = min(k, math.ceil(self.spec_factor * depth))
        out: list[int] = []
        prob = 1.0
        while len(out) < limit:
            nxt = np.concatenate([seq[pos[pos < len(seq)]] for seq, pos in paths])
            nxt = nxt[nxt != SEPARATOR]
            if not len(nxt):
                break
            values, counts = np.unique(nxt, return_counts=True)
            best = int(counts.argmax())
            prob *= counts[best] / len(nxt)
            if prob < self.min_prob:
                break
            token = int(values[best])
            out.append(token)
            paths = [(seq, pos[ok] + 1) for seq, pos in paths
                     for ok in [(pos < len(seq)) & (seq[np.minimum(pos, len(seq) - 1)] == token)]]
        return tuple(out)

    def corpus(self) -> np.ndarray:
        if self._corpus is None:
            parts = [a for out in self._outputs.values() for a in (out, np.array([SEPARATOR]))]
            self._corpus = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return self._corpus

    def release(self, req: Request) -> None:
        """A finished request's output joins the corpus (the oldest beyond the cap leaves)."""
        if req.num_output == 0:
            return
        self._outputs[req.rid] = as_array(req.output_ids)
        self._outputs.move_to_end(req.rid)
        while len(self._outputs) > self.max_cached:
            self._outputs.popitem(last=False)
        self._corpus = None
