"""Tool calling in /v1/chat/completions: what `tools` + `tool_choice` mean for one request.

    tool_choice      the prompt                 the output is constrained to     read by
    none             tools reach the template   nothing                          ContentOnly
    auto (default    tools reach the template   nothing (the model's own format) --tool-call-parser
     with tools)                                                                  (hermes, llama3_json),
                                                                                  else the family's
    required         tools reach the template   [{"name": one of the tools,      RequiredJson
                                                  "parameters": its schema}, ...]
    {"type": "function", "function": {"name"}}  that function's parameters       NamedArgs
                                                 schema
required and named are enforced with structured output (engine/grammar.py), so they hold on
any model; `parallel_tool_calls: false` allows one call. History turns keep their tool data:
an assistant's `tool_calls` (arguments decoded to objects, as chat templates expect) and a
tool result's `tool_call_id` reach the chat template.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampling_params import GrammarSpec
from pdserve.server.errors import bad_request
from pdserve.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from pdserve.server.tool_parsers import PARSERS, ContentOnly, NamedArgs, RequiredJson, ToolStream



@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    parser: str | None = None  # auto: the --tool-call-parser
    grammar: GrammarSpec | None = None  # required / named
    tools: list[dict[str, Any]] | None = None  # for the chat template

    def stream(self) -> ToolStream:
        if self.mode == "auto" and self.parser is not None:
            return PARSERS[self.parser]()
        if self.mode == "required":
            return RequiredJson()
        if self.mode == "named":
            assert self.name is not None
            return NamedArgs(self.name)
        return ContentOnly()


def _params_schema(fn: Any) -> dict[str, Any]:
    return fn.parameters if fn.parameters is not None else {"type": "object"}


def plan(body: ChatCompletionRequest, parser: str) -> ToolPlan:
    """The request's tool plan; a 400 naming the field when tools / tool_choice do not fit."""
    tools, choice = body.tools or [], body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    for i, t in enumerate(tools):
        if t.type != "function":
            raise bad_request(f"tools[{i}].type {t.type!r} is not supported (only 'function')", param=f"tools.{i}.type")
        if not t.function.name:
            raise bad_request(f"tools[{i}].function.name must not be empty", param=f"tools.{i}.function.name")
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", param="tools")
    listed = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                              param="tool_choice")
        fn = tools[names.index(choice.function.name)].function
        schema = json.dumps(_params_schema(fn), sort_keys=True)
        return ToolPlan("named", fn.name, grammar=GrammarSpec("json_schema", schema, param="tool_choice"), tools=listed)
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan("none", tools=listed)
    if choice == "auto":
        return ToolPlan("auto", parser=parser, tools=listed)
    if choice == "required":
        one = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "parameters": _params_schema(t.function)},
                "required": ["name", "parameters"]} for t in tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", grammar=GrammarSpec("json_schema", json.dumps(schema, sort_keys=True),
                                                        param="tool_choice"), tools=listed)
    raise bad_request(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                      param="tool_choice")


def history_fields(i: int, m: ChatMessage) -> dict[str, Any]:
    """The tool data of message `i` for the chat template (empty when it has none)."""
    out: dict[str, Any] = {}
    if m.tool_calls:
        if m.role != "assistant":
            raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
        calls = []
        for j, c in enumerate(m.tool_calls):
            try:
                args = json.loads(c.function.arguments) if c.function.arguments.strip() else {}
            except ValueError:
                raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                                  param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
            calls.append({"id": c.id or new_call_id(), "type": "function",
                          "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
