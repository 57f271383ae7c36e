"""Stop conditions, checked after each sampled token (in priority order):
stop token id → EOS (unless ignore_eos) → stop string (decoded text) → the grammar
terminated (structured output) → max_new_tokens → context end. Also tells the sampler which ids to suppress below `min_new_tokens`.

This is the one place a request's end is decided; the front and the offline API only show the
text (`stop_strings`: hold back a possible stop string, cut at the matched one)."""

from __future__ import annotations

from pdserve.engine.request import Request
from pdserve.engine.stop_strings import find_stop
from pdserve.model.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def suppressed(self, r: Request, ahead: int = 0) -> tuple[int, ...]:
        """Ids to ban for `r`'s next token (`ahead` drafts after its output: a verified row)."""
        p = r.params
        if r.num_output + ahead >= p.min_new_tokens:
            return ()
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_ids))

    def check(self, r: Request) -> None:
        p, tok = r.params, r.tokens[-1]
        if tok in p.stop_token_ids:
            r.finish_reason, r.matched_stop = "stop", tok
        elif not p.ignore_eos and tok in self.eos_ids:
            r.finish_reason, r.matched_stop = "stop", tok
        elif p.stop and self._stop_string(r):
            r.finish_reason = "stop"
        elif r.grammar is not None and r.grammar.terminated:
            r.finish_reason = "stop"
        elif r.num_output >= p.max_new_tokens or len(r.tokens) >= self.max_model_len:
            r.finish_reason = "length"

    def _stop_string(self, r: Request) -> bool:
        # Decode a window of recent tokens: wide enough for the longest stop string plus
        # the newest token, since one token can complete a stop string begun earlier.
        window = max(len(s) for s in r.params.stop) + 8
        text = self.tokenizer.decode(r.output_ids[-window:], skip_special_tokens=r.params.skip_special_tokens)
        found = find_stop(text[-(max(len(s) for s in r.params.stop) + 32):], r.params.stop)
        if found is not None:
            r.matched_stop = found[1]
        return found is not None
