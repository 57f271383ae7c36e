"""POST /v1/responses (OpenAI's Responses API: text and function calls, streamed events or one
answer), and the answers it keeps: GET / DELETE /v1/responses/{id}, GET .../input_items.

Per request, after the shared preamble (server/handler.py): the conversation is the stored one
`previous_response_id` names (server/responses.py) followed by this request's input; it is
answered as the chat route answers (server/openai_chat.py: the tool plan, structured output
from `text.format`, the chat template, the sub-request), and the output text goes through the
plan's tool stream into output items. A stream is OpenAI's event sequence:

    response.created, response.in_progress
    per message:   output_item.added, content_part.added, output_text.delta..., output_text.done,
                   content_part.done, output_item.done
    per call:      output_item.added, function_call_arguments.delta..., function_call_arguments.done,
                   output_item.done
    response.completed (response.incomplete when max_output_tokens cut it)

each `event: TYPE` + `data: {"type", "sequence_number", ...}`. The finished answer is kept for
`previous_response_id` unless `store` is false or this is a PD prefill (whose answer is one
token: the decode keeps the real one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import Request
from starlette.responses import Response

from pdserve.server.errors import APIError
from pdserve.server.generation import Result, SubRequest, merge
from pdserve.server.handler import Route, Whole, generation_router, json_response
from pdserve.server.openai_chat import assistant_message, build_subs
from pdserve.server.protocol import ResponsesRequest
from pdserve.server.responses import (Stored, conversation, input_items, new_item_id, response_object, to_chat,
                                      usage)
from pdserve.server.state import ServerState, get_state
from pdserve.server.tool_parsers import Call, Content, Event
from pdserve.server.tools import ToolPlan, new_call_id
from pdserve.server.tools import plan as tool_plan
from pdserve.server.unsupported import RESPONSES

_RENAMED = {"max_completion_tokens": "max_output_tokens", "messages": "input"}  # chat's names -> this API's
_encode = msgspec.json.Encoder().encode


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Output items of one assistant message (content and tool_calls, as the chat route reads them)."""
    calls = message.get("tool_calls") or []
    out = []
    if message.get("content") or not calls:
        out.append({"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "completed",
                    "content": [_text_part(message.get("content") or "")]})
    for c in calls:
        out.append({"id": new_item_id("fc"), "type": "function_call", "call_id": c["id"],
                    "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    return out


class Events:
    """One stream's events and the output items they build (the module docstring's sequence)."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed

    def event(self, kind: str, **fields: Any) -> bytes:
        data = _encode({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _start(self, item: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.open = item
        self.output.append(item)
        out.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        return out

    def message(self) -> list[bytes]:
        """Start a message item (its text part empty so far)."""
        item = {"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                "content": []}
        out = self._start(item)
        out.append(self.event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                              content_index=0, part=_text_part("")))
        item["text"] = ""
        return out

    def feed(self, e: Event) -> list[bytes]:
        out: list[bytes] = []
        if isinstance(e, Content):
            if not e.text:
                return out
            if self.open is None or self.open["type"] != "message":
                out += self.message()
            item = self.open
            assert item is not None
            item["text"] += e.text
            out.append(self.event("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                                  content_index=0, delta=e.text, logprobs=[]))
            return out
        if isinstance(e, Call):
            out += self._start({"id": new_item_id("fc"), "type": "function_call", "call_id": new_call_id(),
                                "name": e.name, "arguments": "", "status": "in_progress"})
        assert self.open is not None and self.open["type"] == "function_call"
        piece = e.arguments if isinstance(e, Call) else e.text
        if piece:
            self.open["arguments"] += piece
            out.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, delta=piece))
        return out

    def close(self) -> list[bytes]:
        """End the item being streamed (its done events)."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, out = len(self.output) - 1, []
        if item["type"] == "message":
            text = item.pop("text")
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=_text_part(text)))
            item["content"] = [_text_part(text)]
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"]))
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=index, item=dict(item)))
        return out


class _Answer:
    """What both shapes share: the response's fields and where it is kept."""

    def __init__(self, state: ServerState, body: ResponsesRequest, items: list[dict[str, Any]]) -> None:
        self.state, self.body, self.items = state, body, items
        self.id = new_item_id("resp")
        self.model = body.model or state.model_name
        self.created = int(time.time())
        self.previous = body.previous_response_id or body.pdserve_previous_response_id

    def obj(self, status: str, output: list[dict[str, Any]], result: Result | None) -> dict[str, Any]:
        use = usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens) if result else None
        return response_object(self.body, self.id, self.model, self.created, status, output, use, self.previous)

    def finish(self, output: list[dict[str, Any]], result: Result) -> dict[str, Any]:
        obj = self.obj("incomplete" if result.finish_reason == "length" else "completed", output, result)
        if self.body.store and self.state.config.disagg.mode != "prefill":
            self.state.responses.put(Stored(obj, self.items))
        return obj


async def _stream(answer: _Answer, plan: ToolPlan, subs: list[SubRequest]) -> AsyncIterator[bytes]:
    ev = Events()
    yield ev.event("response.created", response=answer.obj("in_progress", [], None))
    yield ev.event("response.in_progress", response=answer.obj("in_progress", [], None))
    tools = plan.stream()
    last = Result(0, subs[0].rid)
    it = merge(answer.state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            events = tools.feed(d.text)
            if d.finish_reason is not None:
                events += tools.finish()
                last = d
            for e in events:
                for f in ev.feed(e):
                    yield f
    for f in ev.close():
        yield f
    if not ev.output:  # nothing at all was said: still one (empty) message, as the whole answer has
        for f in ev.message() + ev.close():
            yield f
    obj = answer.finish(ev.output, last)
    yield ev.event(f"response.{obj['status']}", response=obj)


async def _plan(state: ServerState, body: ResponsesRequest) -> AsyncIterator[bytes] | Whole:
    items = [*conversation(state.responses, body.previous_response_id), *input_items(body)]
    answer = _Answer(state, body, items)
    try:
        chat = to_chat(body, items)
        plan = tool_plan(chat, state.tool_parser)
        subs = await build_subs(state, chat, answer.id, plan)
    except APIError as exc:
        exc.param = _RENAMED.get(exc.param or "", exc.param)
        raise
    if body.stream:
        return _stream(answer, plan, subs)

    def shape(results: list[Result]) -> dict[str, Any]:
        message, _ = assistant_message(plan, results[0].text)
        return answer.finish(_items(message), results[0])

    return Whole(subs, shape)


router = generation_router("/v1/responses", Route("responses", ResponsesRequest, RESPONSES), _plan)


def _kept(request: Request, response_id: str) -> tuple[ServerState, Any]:
    state = get_state(request)
    stored = state.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"No response with id {response_id!r} (this server keeps its last "
                       f"{state.responses.capacity})", param="response_id", code="response_not_found")
    return state, stored


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str) -> Response:
    return json_response(_kept(request, response_id)[1].response)


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str) -> Response:
    state, _ = _kept(request, response_id)
    state.responses.pop(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str, limit: int = 20, order: str = "desc",
                           after: str | None = None) -> Response:
    """OpenAI's paged list of the items before the response (here: its whole conversation)."""
    items = list(_kept(request, response_id)[1].items)
    if not 1 <= limit <= 100 or order not in ("asc", "desc"):
        raise APIError(400, "limit must be in [1, 100] and order asc or desc", param="limit" if order in
                       ("asc", "desc") else "order")
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i.get("id") for i in items]
        if after not in ids:
            raise APIError(400, f"after {after!r} is not an item of {response_id!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
