"""Structured-output and tool fields → GrammarSpec: each source, conflicts, bad values (400s
naming the field), tool history for the chat template."""

from __future__ import annotations

import asyncio
import json

import pytest

from pdserve.server.errors import APIError
from pdserve.server.protocol import ChatCompletionRequest, NativeSamplingParams
from pdserve.server.structured import checked, choice_grammar, native_grammar, openai_grammar
from pdserve.server.tools import history_fields, plan

MSG = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **kw})


def param_of(exc: pytest.ExceptionInfo[APIError]) -> str | None:
    assert exc.value.status == 400
    return exc.value.param


def test_each_openai_source() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = openai_grammar(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                        "strict": True}}))
    assert spec.kind == "json_schema" and json.loads(spec.source) == schema and spec.strict
    assert openai_grammar(chat(response_format={"type": "json_object"})).kind == "json_object"
    assert openai_grammar(chat(response_format={"type": "text"})) is None
    assert json.loads(openai_grammar(chat(guided_json=json.dumps(schema))).source) == schema
    assert openai_grammar(chat(guided_regex="a+")).source == "a+"
    assert openai_grammar(chat(guided_grammar='root ::= "x"')).kind == "ebnf"
    assert openai_grammar(chat(guided_choice=["a", "b"])).kind == "ebnf"


def test_native_sources() -> None:
    sp = NativeSamplingParams.model_validate({"json_schema": '{"type": "object"}'})
    assert native_grammar(sp).param == "sampling_params.json_schema"
    assert native_grammar(NativeSamplingParams.model_validate({"regex": "x"})).kind == "regex"
    assert native_grammar(NativeSamplingParams.model_validate({"ebnf": 'root ::= "x"'})).kind == "ebnf"


def test_conflicts_and_bad_values_are_400s_naming_the_field() -> None:
    with pytest.raises(APIError) as e:
        openai_grammar(chat(guided_regex="a", guided_choice=["b"]))
    assert param_of(e) == "guided_choice"
    with pytest.raises(APIError) as e:
        openai_grammar(chat(response_format={"type": "yaml"}))
    assert param_of(e) == "response_format"
    with pytest.raises(APIError) as e:
        openai_grammar(chat(guided_json="{not json"))
    assert param_of(e) == "guided_json"
    with pytest.raises(APIError) as e:
        choice_grammar([])
    assert param_of(e) == "guided_choice"


@pytest.mark.parametrize("field,value", [("guided_regex", "(a"), ("guided_grammar", "root ::= "),
                                         ("guided_json", {"type": "object", "properties": {"a": {"type": "foo"}}})])
def test_xgrammar_parser_rejects_invalid_constraints(field: str, value: object) -> None:
    with pytest.raises(APIError) as e:
        asyncio.run(checked(openai_grammar(chat(**{field: value}))))
    assert param_of(e) == field and field in e.value.message


def test_choice_grammar_escapes_quotes_and_backslashes() -> None:
    spec = asyncio.run(checked(choice_grammar(['say "hi"', "back\\slash", "new\nline"])))
    assert spec is not None and spec.kind == "ebnf"


def test_tool_plans() -> None:
    p = plan(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), None)
    schema = json.loads(p.grammar.source)
    assert p.mode == "required" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert len(schema["items"]["anyOf"]) == 2
    p = plan(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}), None)
    assert p.mode == "named" and json.loads(p.grammar.source) == WEATHER["function"]["parameters"]
    assert plan(chat(tools=[WEATHER]), "hermes").mode == "auto"
    assert plan(chat(tools=[WEATHER], tool_choice="none"), None).grammar is None
    assert plan(chat(), None).mode == "none"
    # (auto never lacks a parser: the server picks its model family's when none is given)
    for kw, parser in (({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
                       ({"tool_choice": "required"}, None), ({"tools": [WEATHER], "tool_choice": "sometimes"}, None),
                       ({"tools": [WEATHER, WEATHER]}, "hermes")):
        with pytest.raises(APIError) as e:
            plan(chat(**kw), parser)
        assert param_of(e) in ("tool_choice", "tools")


def test_tool_history_reaches_the_template(bundled_model_dir) -> None:
    from pdserve.model.tokenizer import Tokenizer

    body = chat(messages=[*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}])
    fields = [history_fields(i, m) for i, m in enumerate(body.messages)]
    assert fields[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert fields[2] == {"tool_call_id": "call_1"}
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
                "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}{% endfor %}"
                "{% for t in tools or [] %}TOOL {{ t.function.name }}{% endfor %}")
    tok = Tokenizer(bundled_model_dir)
    messages = [{"role": m.role, "content": m.content or "", **f} for m, f in zip(body.messages, fields)]
    text = tok.render_chat(messages, add_generation_prompt=False, chat_template=template,
                           tools=plan(chat(tools=[WEATHER], tool_choice="none"), None).tools)
    assert 'CALL get_weather {"city": "Paris"}' in text and "FOR call_1" in text and "TOOL get_weather" in text
    with pytest.raises(APIError):
        history_fields(0, chat(messages=[{"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]).messages[0])
