"""Structured outputs and tool calling on real servers (bundled SmolLM2), unified and PD.

- 20 different JSON schemas (nested objects, enums, arrays, patterns) through
  response_format json_schema: every output validates with `jsonschema`, on the shared unified
  server and through a prefill + decode pair, streaming and not; PD equals the decode server
  answering locally (the prefill's masked first token, then the decode's matcher from it);
- vLLM's guided_regex / guided_choice / guided_json, SGLang's regex / ebnf / json_schema in
  /generate, response_format json_object; invalid schemas, regexes and grammars get a 400
  naming the field;
- tools with tool_choice required / named (official openai client): tool_calls whose
  arguments validate against the tool's schema; streamed calls reassemble to the same calls;
  tool history reaches the template; "auto" without --tool-call-parser reads the model family's format.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

S = {"type": "string", "maxLength": 10}
I = {"type": "integer", "minimum": 0, "maximum": 500}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": S, "country": {"enum": ["France", "Japan", "Peru"]}},
     "required": ["city", "country"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "code": I}, "required": ["ok", "code"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": I, "nick": S},
                                               "required": ["id", "nick"]}}, "required": ["user"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": I}, "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genre": {"enum": ["drama", "comedy"]}}, "required": ["title", "year", "genre"]},
    {"type": "array", "items": I, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": I, "y": I},
                                                "required": ["x", "y"]}, "label": S}, "required": ["point", "label"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}, "public": {"type": "boolean"}},
     "required": ["tags", "public"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"enum": [1, 2, 3]}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "owner": {"type": ["string", "null"],
                                                                                       "maxLength": 8}},
     "required": ["status", "owner"]},
    {"type": "object", "properties": {"first": S, "last": S, "email": {"type": "string",
                                                                     "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["first", "last", "email"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": I, "maxItems": 2}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"lang": {"enum": ["python", "rust", "go"]}, "stars": I, "fork": {"type": "boolean"}},
     "required": ["lang", "stars", "fork"]},
    {"type": "object", "properties": {"event": S, "when": {"type": "object", "properties": {
        "day": {"type": "integer", "minimum": 1, "maximum": 31}, "month": {"enum": ["jan", "feb", "mar"]}},
        "required": ["day", "month"]}}, "required": ["event", "when"]},
    {"type": "object", "properties": {"pets": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": S}, "required": ["kind", "name"]}}},
     "required": ["pets"]},
    {"type": "object", "properties": {"temperature": I, "unit": {"enum": ["C", "F"]}, "note": S},
     "required": ["temperature", "unit"]},
]
TOPICS = ["a person", "a city", "colors", "a status", "a user", "an order", "a question", "a zip code", "a movie",
          "numbers", "a point", "a post", "nesting", "a ticket", "a contact", "a matrix", "a repo", "an event",
          "pets", "the weather"]
PD_ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "400",
           "--page-size", "16", "--chunk-budget", "64", "--seed", "0", "--max-tokens-cap", "256"]
MAX_TOKENS = 160
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"]}}}


def chat_body(k: int, stream: bool) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": f"Describe {TOPICS[k]} as JSON."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": SCHEMAS[k],
                                                                       "strict": True}}}


def chat_text(status: int | None, payload: Any, stream: bool) -> str:
    assert status == 200, payload
    if not stream:
        return payload["choices"][0]["message"]["content"]
    assert not any("error" in ev for ev in payload), payload
    return "".join(ev["choices"][0]["delta"].get("content") or "" for ev in payload if ev.get("choices"))


async def post(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if not body.get("stream"):
        r = await client.post(url + path, json=body)
        return r.status_code, r.json()
    events = []
    async with client.stream("POST", url + path, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        return r.status_code, events


def gather(url: str, items: list[tuple[str, dict[str, Any]]], concurrency: int = 8) -> list[tuple[int, Any]]:
    async def run() -> list[tuple[int, Any]]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(path: str, body: dict[str, Any]) -> tuple[int, Any]:
                async with sem:
                    return await post(client, url, path, body)
            return await asyncio.gather(*(one(p, b) for p, b in items))
    return asyncio.run(run())


def validate(text: str, schema: dict[str, Any]) -> None:
    try:
        jsonschema.validate(json.loads(text), schema)
    except Exception as exc:
        raise AssertionError(f"{text!r} does not validate against {schema}: {exc}") from None


@pytest.mark.parametrize("stream", [False, True])
def test_twenty_schemas_validate_on_unified(base_url: str, stream: bool) -> None:
    replies = gather(base_url, [("/v1/chat/completions", chat_body(k, stream)) for k in range(len(SCHEMAS))])
    for k, (status, payload) in enumerate(replies):
        validate(chat_text(status, payload, stream), SCHEMAS[k])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[Any]:
    from tests.integration.pd_cluster import running_pair

    with running_pair(tmp_path_factory.mktemp("structured-pd"), "tcp", PD_ARGS) as p:
        yield p


def test_twenty_schemas_validate_through_pd_and_equal_the_decode_alone(pair: Any) -> None:
    items = [("/v1/chat/completions", chat_body(k, stream), stream) for stream in (False, True)
             for k in range(len(SCHEMAS))]
    results = pair.many(items, concurrency=8)
    local = gather(pair.decode.url, [("/v1/chat/completions", chat_body(k, False)) for k in range(len(SCHEMAS))])
    for i, ((path, body, stream), res) in enumerate(zip(items, results)):
        k = i % len(SCHEMAS)
        assert res.prefill.status == 200, res.prefill.describe()
        text = chat_text(res.decode.status, res.decode.events if stream else res.decode.json, stream)
        validate(text, SCHEMAS[k])
        assert text == chat_text(*local[k], False), (k, stream)
    pair.settled()


def test_pd_regex_and_choice(pair: Any) -> None:
    body = {"text": "My phone number is", "sampling_params": {"max_new_tokens": 20, "temperature": 0,
                                                              "regex": r"\d{3}-\d{3}-\d{4}"}}
    res = pair.request("/generate", body)
    assert re.fullmatch(r"\d{3}-\d{3}-\d{4}", res.decode.json["text"]), res.decode.json
    chat = {"messages": [{"role": "user", "content": "Pick a color."}], "max_tokens": 10, "temperature": 0,
            "guided_choice": ["red", "green", "blue"], "stream": True}
    res = pair.request("/v1/chat/completions", chat, stream=True)
    assert chat_text(res.decode.status, res.decode.events, True) in ("red", "green", "blue")
    pair.settled()


def test_regex_choice_grammar_and_json_object_hold(base_url: str) -> None:
    msgs = [{"role": "user", "content": "Give me a date."}]
    items = [
        ("/v1/completions", {"prompt": "Date:", "max_tokens": 20, "temperature": 0.8, "seed": 5,
                             "guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"}),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "guided_choice": ["yes", "no", "it \"depends\""],
                                  "temperature": 1.0, "seed": 2}),
        ("/generate", {"text": "Answer:", "sampling_params": {"max_new_tokens": 10, "temperature": 0,
                                                              "ebnf": 'root ::= "A" | "B" | "C" [0-9]'}}),
        ("/generate", {"text": "JSON:", "sampling_params": {"max_new_tokens": 60, "temperature": 0,
                                                            "json_schema": json.dumps(SCHEMAS[0])}}),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 80, "temperature": 0,
                                  "guided_json": SCHEMAS[1]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A JSON object, please."}],
                                  "max_tokens": 120, "temperature": 0, "response_format": {"type": "json_object"}}),
    ]
    r = gather(base_url, items)
    assert all(s == 200 for s, _ in r), r
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r[0][1]["choices"][0]["text"])
    assert r[1][1]["choices"][0]["message"]["content"] in ("yes", "no", 'it "depends"')
    assert re.fullmatch(r"A|B|C[0-9]", r[2][1]["text"])
    validate(r[3][1]["text"], SCHEMAS[0])
    validate(r[4][1]["choices"][0]["message"]["content"], SCHEMAS[1])
    out = r[5][1]["choices"][0]
    assert out["finish_reason"] == "length" or isinstance(json.loads(out["message"]["content"]), dict)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format.json_schema"),
    ("/v1/chat/completions", {"guided_json": {"$ref": "#/definitions/missing"}}, "guided_json"),
    ("/v1/completions", {"guided_regex": "([a-z]"}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": "root ::= ("}, "guided_grammar"),
    ("/generate", {"sampling_params": {"regex": "[0-9"}}, "sampling_params.regex"),
    ("/generate", {"sampling_params": {"json_schema": "{not json"}}, "sampling_params.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
])
def test_invalid_constraints_are_400_naming_the_field(base_url: str, path: str, body: dict[str, Any],
                                                      param: str) -> None:
    base = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            "/v1/completions": {"prompt": "hi", "max_tokens": 5}, "/generate": {"text": "hi"}}[path]
    full = {**base, **body}
    if path == "/generate":
        full["sampling_params"] = {"max_new_tokens": 5, **body["sampling_params"]}
    r = httpx.post(base_url + path, json=full, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def _schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in (WEATHER, TIME) if t["function"]["name"] == name)


def _streamed_calls(stream: Any) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", ""])
                if tc.function and tc.function.name:
                    entry[0] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry[1] += tc.function.arguments
    return [(n, a) for n, a in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate_and_stream_the_same(base_url: str, choice: Any) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=120)
    kw = dict(model="default", messages=[{"role": "user", "content": "What's the weather in Paris and the time in Tokyo?"}],
              tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120, temperature=0)
    resp = client.chat.completions.create(**kw)
    calls = resp.choices[0].message.tool_calls
    assert calls, resp
    for c in calls:
        assert c.id and c.type == "function"
        jsonschema.validate(json.loads(c.function.arguments), _schema_of(c.function.name))
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]
    streamed = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert streamed == [(c.function.name, c.function.arguments) for c in calls]
    one = client.chat.completions.create(**{**kw, "parallel_tool_calls": False})
    assert len(one.choices[0].message.tool_calls or []) == 1 or isinstance(choice, dict)


def test_tool_history_and_auto_with_the_family_parser(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=120)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    resp = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert resp.choices[0].message.content is not None
    auto = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], max_tokens=8)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")  # the family's parser, no 400
