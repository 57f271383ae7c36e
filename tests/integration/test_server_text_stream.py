"""The front's TextStream (incremental detokenization, text shown as the engine's stop decision
says), in process, on the bundled tokenizer: pieces join to the offline decode-then-truncate
text, token by token. `_feed` plays the engine: it stops at the first token whose decoded
output contains a stop string (`find_stop`, what engine/stop.py decides with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.engine.stop_strings import cut_at_stop as truncate_at_stop
from pdserve.engine.stop_strings import find_stop
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.text_stream import TextStream

TEXT = "Hello wörld! The answer is 42.\n\nNext: 🙂 done; stop here END and more text after."


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path) -> Tokenizer:
    return Tokenizer(bundled_model_dir)


def _feed(ts: TextStream, ids: list[int], step: int = 1) -> tuple[list[str], int]:
    pieces, used, matched = [], 0, None
    for i in range(0, len(ids), step):
        pieces.append(ts.add(ids[i:i + step]))
        used = i + step
        found = find_stop(ts.detok.tokenizer.decode(ids[:used]), ts.stop)
        if found is not None:
            matched = found[1]
            break
    pieces.append(ts.finish(matched))
    return pieces, min(used, len(ids))


@pytest.mark.parametrize("step", [1, 3])
def test_no_stop_equals_full_decode(tok: Tokenizer, step: int) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    pieces, _ = _feed(TextStream(tok, [1, 2]), ids, step)
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("stop", ["END", "\n\n", "🙂", "42.", "after.", "d!", "not present"])
def test_stop_strings_cut_like_offline(tok: Tokenizer, stop: str) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    ts = TextStream(tok, (), stop=[stop, "zzz-never"])
    pieces, used = _feed(ts, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == truncate_at_stop(full, stop)
    if stop in full:
        assert ts.matched == stop
        assert stop in tok.decode(ids[:used]) and stop not in tok.decode(ids[:used - 1])  # stopped at once
    else:
        assert ts.matched is None


def test_partial_stop_is_held_back_then_released(tok: Tokenizer) -> None:
    ts = TextStream(tok, (), stop=["Hello world!"])
    ids = tok.encode("Hello wor", add_special_tokens=False)
    sent = "".join(ts.add([i]) for i in ids)
    assert sent == ""  # could still become the stop string
    assert ts.finish() == "Hello wor"


def test_include_stop(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    ts = TextStream(tok, (), stop=["END"], include_stop=True)
    pieces, _ = _feed(ts, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full[:full.index("END") + 3]
