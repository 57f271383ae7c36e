"""Structured output in the engine: grammars compiled off the loop, token bitmasks per step.

Lifecycle of a constrained request (its `SamplingParams.grammar` is a `GrammarSpec`):

  add_request ─▶ GrammarQueue.add ─▶ Grammars.submit(spec)   compile in the grammar thread
                 │                  (xgrammar), cached by spec: the same schema compiles once per engine
                 ▼
  GrammarQueue.poll() each step ── compiled ─▶ ready: a fresh GrammarState (matcher) for the
                 │                              request, which then goes to the scheduler / PD stage
                 └── compile failed ─▶ refused: the engine answers a 400 naming the grammar's field
  every step:  Grammars.mask(logits, states)   fill each constrained row's bitmask from its
                                                matcher, -inf the disallowed logits (in place)
               after sampling: state.accept(token)   advance the matcher; terminated ends the
                                                     request (engine/stop.py reads it)
  PD: the prefill masks the first token like any step; the decode's matcher starts from the
  transferred first token (DecodeStage commits it through state.accept).
  speculative decoding: `state.valid_prefix(drafts)` cuts a proposal at the first token the
  grammar refuses; a verified row j is masked from the matcher after drafts[:j] (accepted, the
  mask filled, rolled back: `state.fill`); accepted tokens then advance it as usual.

The engine step never compiles: a request joins the batch only with its grammar compiled.
Nothing here crosses a socket: only the spec (two strings) travels in SamplingParams.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from pdserve.engine.messages import Bootstrap
from pdserve.engine.sampling_params import GrammarSpec

if TYPE_CHECKING:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Hashable)  # what waits (the engine's Request)
CACHE_ENTRIES = 256  # compiled grammars kept per engine (LRU)
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[14:00:20] /project/cpp/x.cc:94: "


def grammar_error(exc: BaseException) -> str:
    """xgrammar's error message without its C++ source location."""
    return _CPP_PREFIX.sub("", str(exc).strip()) or type(exc).__name__


def _compile(compiler: "xgr.GrammarCompiler", spec: GrammarSpec) -> "xgr.CompiledGrammar":
    if spec.kind == "json_schema":
        return compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=spec.strict)
    if spec.kind == "json_object":  # any object (not any JSON value), compact like the schemas
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.source)
    if spec.kind == "ebnf":
        return compiler.compile_grammar(spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


class GrammarState:
    """One request's matcher: which tokens may come next, advanced by each accepted token."""

    def __init__(self, compiled: "xgr.CompiledGrammar") -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.rejected = False  # a token the grammar refused was forced in (the request ends)

    @property
    def terminated(self) -> bool:
        return self.rejected or self.matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        if self.terminated:
            return
        if not self.matcher.accept_token(token_id):
            log.warning("grammar refused token %d; ending the request", token_id)
            self.rejected = True

    def _advance(self, tokens: tuple[int, ...]) -> int:
        """Accept `tokens` while the grammar allows them and is not terminated; how many went in."""
        n = 0
        for t in tokens:
            if self.matcher.is_terminated() or not self.matcher.accept_token(t):
                break
            n += 1
        return n

    def valid_prefix(self, drafts: tuple[int, ...]) -> int:
        """How many of `drafts` the grammar allows in a row (up to one that terminates it);
        the matcher is left as it was."""
        if self.terminated:
            return 0
        n = self._advance(drafts)
        if n:
            self.matcher.rollback(n)
        return n

    def fill(self, bitmask: torch.Tensor, row: int, ahead: tuple[int, ...] = ()) -> bool:
        """Row `row` of `bitmask`: the tokens allowed after `ahead` (False, nothing filled: the
        grammar is over there, the row is free)."""
        n = self._advance(ahead)
        live = n == len(ahead) and not self.matcher.is_terminated()
        if live:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        if n:
            self.matcher.rollback(n)
        return live


class Grammars:
    """The engine's grammar compiler (one thread, LRU cache of futures) and bitmask buffer."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", vocab_size: int, stop_ids: frozenset[int],
                 cache: bool = True) -> None:
        self.vocab_size = vocab_size
        self.cache_enabled = cache
        self._tokenizer = tokenizer
        self._stop_ids = sorted(stop_ids)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-grammar")
        self._compiler: "xgr.GrammarCompiler | None" = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], Future["xgr.CompiledGrammar"]] = OrderedDict()
        self._bitmask: torch.Tensor | None = None

    def _get_compiler(self) -> "xgr.GrammarCompiler":
        with self._lock:  # built in the grammar thread: importing xgrammar and reading the
            if self._compiler is None:  # vocabulary takes seconds the engine loop should not wait
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def submit(self, spec: GrammarSpec) -> Future["xgr.CompiledGrammar"]:
        """The compiled grammar of `spec`, as a future (done at once when cached)."""
        key = (spec.kind, spec.source, spec.strict)
        fut = self._cache.get(key) if self.cache_enabled else None
        if fut is not None:
            self._cache.move_to_end(key)
            return fut
        fut = self._pool.submit(lambda: _compile(self._get_compiler(), spec))
        if self.cache_enabled:
            self._cache[key] = fut
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return fut

    def forget(self, spec: GrammarSpec) -> None:
        """Drop a failed compile from the cache (the engine thread calls it; the next try recompiles)."""
        self._cache.pop((spec.kind, spec.source, spec.strict), None)

    def mask(self, logits: torch.Tensor, states: list[GrammarState | None],
             ahead: list[tuple[int, ...]] | None = None) -> None:
        """-inf (in place) every logit the row's grammar disallows, after the row's `ahead` tokens
        (a verified row's drafts); rows with None are free."""
        import xgrammar as xgr

        if not any(s is not None and not s.terminated for s in states):
            return
        n = len(states)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = xgr.allocate_token_bitmask(max(n, 16), self.vocab_size)
        bitmask = self._bitmask
        rows = [i for i, s in enumerate(states)
                if s is not None and not s.terminated and s.fill(bitmask, i, ahead[i] if ahead else ())]
        if not rows:
            return
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True)[:n],
                                        vocab_size=self.vocab_size, indices=rows)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarQueue(Generic[T]):
    """Constrained requests waiting for their grammar to compile, each with the bootstrap it came
    with (a PD request goes to its stage once ready). The engine step asks `poll()` which are
    ready (with a fresh matcher) and which were refused (an invalid grammar: the 400's message)."""

    def __init__(self, grammars: Grammars) -> None:
        self.grammars = grammars
        self._waiting: dict[T, tuple[GrammarSpec, Bootstrap | None, Future["xgr.CompiledGrammar"]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: T, spec: GrammarSpec, boot: Bootstrap | None) -> None:
        self._waiting[item] = (spec, boot, self.grammars.submit(spec))

    def discard(self, item: T) -> bool:
        """Forget `item` (aborted while compiling; it holds nothing); False if it was not here."""
        return self._waiting.pop(item, None) is not None

    def poll(self) -> tuple[list[tuple[T, GrammarState, Bootstrap | None]], list[tuple[T, str]]]:
        """(ready: item, its matcher, its bootstrap), (refused: item, why) since the last poll."""
        ready, refused = [], []
        for item, (spec, boot, fut) in [(i, w) for i, w in self._waiting.items() if w[2].done()]:
            del self._waiting[item]
            try:
                ready.append((item, GrammarState(fut.result()), boot))
            except Exception as exc:  # an invalid schema / regex / grammar
                self.grammars.forget(spec)
                refused.append((item, f"{spec.param}: invalid {spec.kind.replace('_', ' ')}: {grammar_error(exc)}"))
        return ready, refused
