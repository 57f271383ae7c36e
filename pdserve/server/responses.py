"""The Responses API's shapes over pdserve's chat path: input items in, output items out, and
the answers a server keeps for `previous_response_id`.

    input (a string, or items)  ──to_chat──▶  ChatCompletionRequest  (openai_responses.py runs it
    instructions, tools, tool_choice, text.format                      as /v1/chat/completions does)
    tool-stream events (Content, Call, Arguments)  ──Output──▶  output items: `message` with
                                                                 `output_text`, `function_call`

Items read: `message` (role user / assistant / system / developer; content a string or
`input_text` / `output_text` parts), `function_call` (an assistant turn's call: consecutive
ones join one assistant message), `function_call_output` (a tool result), `reasoning` (dropped:
a model's hidden reasoning has no place in the template). Anything else, a non-text part, a
built-in tool or a hosted tool choice is a 400 naming its field.

`ResponseStore` keeps finished answers (oldest dropped first, `--responses-kept`): each with its
whole conversation up to it (`items`: the previous response's items and output, then this
request's input), so `previous_response_id` continues it; a router that cannot know which
worker kept an answer fetches them (`GET /v1/responses/{id}` and `.../input_items`) and sends
the conversation itself (contract.PREVIOUS_RESPONSE names the id it replaced).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pdserve.server.errors import APIError, bad_request
from pdserve.server.protocol import ChatCompletionRequest, ResponsesRequest

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
RESPONSES_ONLY = ("input", "instructions", "max_output_tokens", "tools", "tool_choice", "previous_response_id",
                  "store", "text", "metadata")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Stored:
    response: dict[str, Any]  # the response object as answered
    items: list[dict[str, Any]]  # the conversation before it (input items, each with an id)


@dataclass
class ResponseStore:
    """Finished answers by id, at most `capacity` (oldest dropped first; 0 keeps none)."""

    capacity: int
    kept: OrderedDict[str, Stored] = field(default_factory=OrderedDict)

    def put(self, stored: Stored) -> None:
        if self.capacity <= 0:
            return
        self.kept[stored.response["id"]] = stored
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        return self.kept.get(response_id)

    def pop(self, response_id: str) -> Stored | None:
        return self.kept.pop(response_id, None)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}]: only text parts are supported, got {kind!r}", param=f"{where}.{j}")
        texts.append(part["text"])
    return "".join(texts)


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's input as items (a string is one user message), each with an id."""
    items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) \
        else [dict(item) for item in body.input]
    for item in items:
        if "role" in item and "type" not in item:
            item["type"] = "message"
        item.setdefault("id", new_item_id("msg" if item.get("type") == "message" else "item"))
    return items


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages (ChatMessage fields) of a conversation's items, after the instructions."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        kind, where = item.get("type", "message"), f"input.{i}"
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad_request(f"{where}.role {role!r} is not one of {list(ROLES)}", param=f"{where}.role")
            out.append({"role": role, "content": _text_of(item.get("content", ""), f"{where}.content")})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}: a function_call needs name and call_id", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}: a function_call_output needs call_id", param=f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text_of(item.get("output", ""), f"{where}.output")})
        elif kind != "reasoning":
            raise bad_request(f"{where}.type {kind!r} is not supported (message, function_call, "
                              "function_call_output)", param=f"{where}.type")
    return out


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise bad_request(f"tools[{i}].type {tool.get('type')!r} is not supported (only 'function')",
                              param=f"tools.{i}.type")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(f"tool_choice {choice!r} is not supported (auto, none, required, or "
                      "{\"type\": \"function\", \"name\": ...})", param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise bad_request(f"text.format.type {fmt.get('type')!r} is not supported", param="text.format.type")


def to_chat(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that answers `body` over the conversation `items`."""
    fields = body.model_dump(exclude=set(RESPONSES_ONLY), exclude_none=True, by_alias=True)
    fields.update(messages=to_messages(items, body.instructions), tools=_chat_tools(body.tools),
                  tool_choice=_chat_tool_choice(body.tool_choice), max_completion_tokens=body.max_output_tokens,
                  response_format=_response_format(body.text) or fields.get("response_format"))
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


def conversation(store: ResponseStore, previous: str | None) -> list[dict[str, Any]]:
    """The items a `previous_response_id` continues: its conversation and its output."""
    if previous is None:
        return []
    stored = store.get(previous)
    if stored is None:
        raise APIError(400, f"Previous response with id {previous!r} not found (this server keeps its last "
                       f"{store.capacity} answers)", param="previous_response_id", code="previous_response_not_found")
    return [*stored.items, *stored.response["output"]]


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_object(body: ResponsesRequest, rid: str, model: str, created: int, status: str,
                    output: list[dict[str, Any]], use: dict[str, Any] | None, previous: str | None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None, "error": None,
        "incomplete_details": incomplete, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": previous,
        "temperature": body.temperature, "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}}, "truncation": "disabled",
        "usage": use, "metadata": body.metadata or {}, "store": body.store, "background": False,
        "user": body.user,
    }
