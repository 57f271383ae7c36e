"""Stop strings as text: where one matches, what must be held back, where to cut.

The engine decides that a request stopped (`engine/stop.py` calls `find_stop` on the decoded
tail of its output); the HTTP front and the offline API only detokenize and use these to show
the text: hold back a tail that may still become a stop string, and cut at the matched one.

    text:  "... answer is 42. E"        stop "END": hold back "E" (a proper prefix of "END")
    text:  "... answer is 42. END more"  matched "END": cut before it (or after, include_stop)
No heavy imports: the front process imports this.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in `text[start:]` as (index, stop), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start) if s else -1
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: Sequence[str], sent: int) -> int:
    """Length of the longest tail of `text[sent:]` that is a proper prefix of some stop string."""
    longest = max((len(s) for s in stops), default=0)
    for n in range(min(longest - 1, len(text) - sent), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def cut_at_stop(text: str, stop: str, include_stop: bool = False) -> str:
    """`text` cut before the first occurrence of `stop` (after it with `include_stop`);
    unchanged if absent or empty."""
    if not stop:
        return text
    index = text.find(stop)
    if index < 0:
        return text
    return text[: index + len(stop)] if include_stop else text[:index]
