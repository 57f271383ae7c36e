"""Tool-call parsers on sample outputs of each format: whole text and streamed in pieces give
the same calls and content; malformed blocks come back as content, never dropped."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.server.tool_parsers import Arguments, Call, Content, Hermes, Llama3Json, NamedArgs, RequiredJson

QWEN_TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
                  '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
LLAMA_TWO_CALLS = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
REQUIRED = '[{"name":"get_weather","parameters":{"city":"Pa\\"ris}"}},{"name":"get_time","parameters":{"tz":"[x]"}}]'


def run(stream, text: str, pieces: int | None = None, seed: int = 0) -> tuple[str, list[tuple[str, str]]]:
    """Feed `text` whole (pieces None) or cut at random places; return (content, [(name, args)])."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces, len(text) - 1))) if pieces else []
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    events = [e for p in parts for e in stream.feed(p)] + stream.finish()
    content, calls = "", []
    for e in events:
        if isinstance(e, Content):
            content += e.text
        elif isinstance(e, Call):
            calls.append([e.name, e.arguments])
        else:
            assert isinstance(e, Arguments)
            calls[-1][1] += e.text
    return content, [tuple(c) for c in calls]


@pytest.mark.parametrize("pieces", [None, 5, 40, 10_000])
def test_hermes_calls_and_content(pieces: int | None) -> None:
    content, calls = run(Hermes(), QWEN_TWO_CALLS, pieces and min(pieces, len(QWEN_TWO_CALLS) - 1))
    assert content.strip() == "Let me check."
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris", "unit": "c"}),
                                                        ("get_time", {"tz": "CET"})]


def test_hermes_plain_text_and_lookalikes_stay_content() -> None:
    text = "a < b and <tool_ is not a call; <tool_call>not json</tool_call> done"
    for pieces in (None, 7, len(text) - 1):
        content, calls = run(Hermes(), text, pieces)
        assert calls == [] and content == text


def test_hermes_unclosed_block_at_the_end_still_counts() -> None:
    content, calls = run(Hermes(), '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', 9)
    assert content == "" and calls == [("f", '{"x": 1}')]


@pytest.mark.parametrize("pieces", [None, 3, 30])
def test_llama3_json_calls(pieces: int | None) -> None:
    for text in (LLAMA_TWO_CALLS, "<|python_tag|>" + LLAMA_TWO_CALLS, "  \n" + LLAMA_TWO_CALLS):
        content, calls = run(Llama3Json(), text, pieces)
        assert content == ""
        assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_llama3_json_text_is_content() -> None:
    for text in ("The weather is nice.", '{"not": "a call"}', '{"name": "f", "parameters": {} trailing'):
        content, calls = run(Llama3Json(), text, 4)
        assert calls == [] and content == text


@pytest.mark.parametrize("pieces", [None, 6, len(REQUIRED) - 1])
def test_required_array_streams_each_call_when_it_closes(pieces: int | None) -> None:
    content, calls = run(RequiredJson(), REQUIRED, pieces)
    assert content == ""
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": 'Pa"ris}'}), ("get_time", {"tz": "[x]"})]
    stream = RequiredJson()
    first = stream.feed(REQUIRED[: REQUIRED.index("},{") + 2])
    assert [type(e) for e in first] == [Call]  # the first call is out before the second begins


def test_required_cut_off_shows_the_partial_call() -> None:
    content, calls = run(RequiredJson(), '[{"name":"f","parameters":{"a":', 3)
    assert calls == [] and content == '{"name":"f","parameters":{"a":'


def test_named_args_stream_as_they_come() -> None:
    content, calls = run(NamedArgs("f"), '{"city": "Paris"}', 5)
    assert content == "" and calls == [("f", '{"city": "Paris"}')]
    assert NamedArgs("f").feed('{"a"')[0] == Call("f", "")
