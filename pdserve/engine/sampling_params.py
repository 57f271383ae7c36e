"""Per-request sampling parameters: one typed struct that crosses every process boundary.

`SamplingParams` is a frozen msgspec Struct so the HTTP front, the engine process and the
offline API share one definition and it encodes to msgpack without pickle. `validate` names
the offending field in its error so the server can answer a 400 with `param` set.

vLLM's names are accepted too (`max_tokens`, `min_tokens`, `logprobs=<int>`, `n=1`): the
construction hook folds them into pdserve's fields and clears them, so a struct only ever
carries pdserve's own (and `replace` / decoding see the same values).
"""

from __future__ import annotations

import msgspec


class SamplingError(ValueError):
    """A request parameter is invalid; `param` names the field (OpenAI error bodies use it)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # OpenAI error code, e.g. "context_length_exceeded"


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, param: str = "prompt") -> None:
    """The one prompt check (the front runs it before a request reaches the engine, the engine
    again for the offline API): non-empty, in-vocabulary, leaving room for one new token."""
    if not ids:
        raise SamplingError("the prompt is empty", param)
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = next(i for i in ids if i < 0 or i >= vocab_size)
        raise SamplingError(f"token id {bad} is out of vocabulary (valid ids are 0..{vocab_size - 1})", param)
    if len(ids) >= max_model_len:
        raise SamplingError(f"the prompt has {len(ids)} tokens but the context is {max_model_len} tokens "
                            "(it must leave room for at least one new token)", param, "context_length_exceeded")


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf")


class GrammarSpec(msgspec.Struct, frozen=True):
    """A structured-output constraint as its source text; the engine compiles it (engine/grammar.py).

    kind: "json_schema" (source: the schema as JSON text), "json_object" (any JSON object,
    source ""), "regex" or "ebnf" (source: the pattern / grammar). `param` names the request
    field it came from, so a compile error can say which one is wrong. Hashable: the cache key.
    """

    kind: str
    source: str = ""
    strict: bool = True  # json_schema: no properties / items beyond the schema's
    param: str = "response_format"


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # return the logprob of each sampled token
    top_logprobs: int = 0  # and the k most likely alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100..100)
    include_stop_str_in_output: bool = False  # offline text keeps the matched stop string
    grammar: GrammarSpec | None = None  # structured output: the tokens must follow it
    # vLLM's names, folded into the fields above by __post_init__ (always None / 1 afterwards)
    max_tokens: int | None = None
    min_tokens: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        set_ = msgspec.structs.force_setattr
        if self.max_tokens is not None:
            set_(self, "max_new_tokens", self.max_tokens)
            set_(self, "max_tokens", None)
        if self.min_tokens is not None:
            set_(self, "min_new_tokens", self.min_tokens)
            set_(self, "min_tokens", None)
        if not isinstance(self.logprobs, bool) and isinstance(self.logprobs, int):  # vLLM: logprobs=k
            set_(self, "top_logprobs", max(self.top_logprobs, self.logprobs))
            set_(self, "logprobs", True)
        elif self.logprobs is None:
            set_(self, "logprobs", False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, max_top_logprobs: int = 20) -> None:
        def bad(msg: str, param: str) -> None:
            raise SamplingError(msg, param)

        if self.max_new_tokens < 0:
            bad(f"max_new_tokens must be >= 0, got {self.max_new_tokens}", "max_tokens")
        if self.min_new_tokens < 0 or self.min_new_tokens > max(self.max_new_tokens, 0):
            bad(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}", "min_tokens")
        if not self.temperature >= 0.0:
            bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            bad(f"top_k must be -1 (off) or >= 1, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not self.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not 0 <= self.top_logprobs <= max_top_logprobs:
            bad(f"top_logprobs must be in [0, {max_top_logprobs}], got {self.top_logprobs}", "top_logprobs")
        if any(not s for s in self.stop):
            bad("stop strings must be non-empty", "stop")
        if self.grammar is not None and self.grammar.kind not in GRAMMAR_KINDS:
            bad(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.grammar.kind!r}", self.grammar.param)
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative", "stop_token_ids")
        if self.n != 1:
            bad(f"n = {self.n} is not supported here: send the prompt n times (seeds differ per copy)", "n")
        for tid, bias in (self.logit_bias or {}).items():
            if tid < 0:
                bad(f"logit_bias token id {tid} must be non-negative", "logit_bias")
            if not -100.0 <= bias <= 100.0:
                bad(f"logit_bias values must be in [-100, 100], got {bias} for token {tid}", "logit_bias")
