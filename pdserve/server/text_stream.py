"""Output text of one request in the front: incremental detokenization, shown as the engine decided.

One `TextStream` per engine request. `add(ids)` feeds newly generated ids and returns the text
that is safe to send now: a tail that could still turn out to be the start of a stop string is
held back, and so is a whole one (display only: whether and where the request stopped is the
engine's decision, `engine/stop.py`, which reports it with the same token's output).
`finish(matched)` ends it: with the engine's matched stop string the text is cut before it (or
after it with `include_stop`), and the held text is released. Joined, the pieces equal the
offline engine's decode-then-cut text.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.stop_strings import cut_at_stop, find_stop, held_back
from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.text = ""  # all decoded text so far (cut at the stop string once finished)
        self.sent = 0  # characters of `text` already handed out
        self.matched: str | None = None

    def add(self, ids: Sequence[int]) -> str:
        """Feed new ids; return the text that may be sent now ('' when nothing)."""
        if ids:
            self.text += self.detok.add(ids)
        upto = len(self.text) - held_back(self.text, self.stop, self.sent)
        found = find_stop(self.text, self.stop, self.sent)  # the engine ends the request on this
        return self._release(upto if found is None else min(upto, found[0]))  # token: hold it back

    def finish(self, matched: int | str | None = None) -> str:
        """The request ended (`matched`: the engine's matched stop, if a string, it is cut at);
        return whatever text is still held back."""
        self.text += self.detok.flush()
        if isinstance(matched, str) and matched in self.stop:
            self.matched = matched
            cut = cut_at_stop(self.text[self.sent:], matched, self.include_stop)
            self.text = self.text[: self.sent] + cut
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
