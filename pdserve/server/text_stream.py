"""Output text of one request in the front: incremental detokenization plus stop strings.

One `TextStream` per engine request. `add(ids)` feeds newly generated ids and returns the text
that is safe to send now: text that could still turn out to be the start of a stop string is
held back until it can't. When a stop string shows up, the text is cut before it (or after it
with `include_stop`), `matched` names it and the request is over; `finish()` releases the held
text at the end. Joined, the pieces equal the offline engine's decode-then-truncate text.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all decoded text kept so far (cut at a stop string once matched)
        self.sent = 0  # characters of `text` already handed out
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def add(self, ids: Sequence[int]) -> str:
        """Feed new ids; return the text that may be sent now ('' when nothing)."""
        if self.matched is not None or not ids:
            return ""
        delta = self.detok.add(ids)
        if delta:
            self._append(delta)
        return self._release(final=self.matched is not None)

    def finish(self) -> str:
        """The request ended: return whatever text is still held back."""
        if self.matched is None:
            rest = self.detok.flush()
            if rest:
                self._append(rest)
        return self._release(final=True)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += delta
        if self.stop:
            self._search_from(start)

    def _search_from(self, start: int) -> None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return
        i, s = best
        end = i + len(s) if self.include_stop else i
        self.text = self.text[:max(end, self.sent)]
        self.matched = s

    def _release(self, final: bool) -> str:
        upto = len(self.text) if final or not self.stop else len(self.text) - self._held_suffix()
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        text = self.text
        for n in range(min(self._max_stop - 1, len(text) - self.sent), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
