"""POST /v1/chat/completions (OpenAI chat; streaming and not) over the model's chat template.

Per request, after the shared preamble (server/handler.py: the body decoded and validated, the
model checked): turn the messages into plain {role, content} dicts (text parts only; tool
calls and tool results keep their fields), plan tool use (server/tools.py) and structured
output (server/structured.py), render the messages (and tools) with the model's chat template
into prompt ids, fan out n sub-requests, then either stream `chat.completion.chunk`s (a role
delta first, content and tool_calls deltas, a final delta with `finish_reason`, a usage chunk
when `stream_options.include_usage`, then `[DONE]`) or answer one `chat.completion` body.
Output text goes through the plan's ToolStream (server/tool_parsers.py) in both shapes.
`max_completion_tokens` wins over `max_tokens`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pdserve.server.errors import bad_request
from pdserve.server.generation import Result, SubRequest, merge
from pdserve.server.handler import Route, Whole, fan_out, generation_router, sub_rids
from pdserve.server.openai_common import (
    TokenTexts,
    accepted_drafts,
    chat_logprobs,
    include_usage,
    openai_params,
    response_head,
    usage,
)
from pdserve.server.params import check_n, check_prompt_ids, off_loop, resolve_max_tokens
from pdserve.server.protocol import ChatCompletionRequest
from pdserve.server.sse import frame, with_ids
from pdserve.server.state import ServerState
from pdserve.server.structured import checked, openai_grammar
from pdserve.server.tool_parsers import Call, Content, Event
from pdserve.server.tools import ToolPlan, history_fields, new_call_id
from pdserve.server.tools import plan as tool_plan
from pdserve.server.unsupported import CHAT

_RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tokenize", "add_generation_prompt", "tools",
                             "documents", "continue_final_message", "return_tensors", "return_dict",
                             "chat_template", "tokenizer_kwargs", "padding", "truncation", "max_length"}
_ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
# OpenAI requires `content` for these roles (an assistant turn may carry only tool calls).
_CONTENT_REQUIRED = {"system", "user", "tool", "developer"}


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    if not body.messages:
        raise bad_request("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in _ROLES:
            raise bad_request(f"messages[{i}].role {m.role!r} is not one of {sorted(_ROLES)}", param=f"messages.{i}.role")
        if m.content is None and m.role in _CONTENT_REQUIRED:
            raise bad_request(f"messages[{i}].content is required for a {m.role!r} message",
                              param=f"messages.{i}.content")
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported, got {part.type!r}",
                                      param=f"messages.{i}.content.{j}")
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                    **history_fields(i, m)})
    return out


async def chat_prompt_ids(state: ServerState, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
    kwargs = dict(body.chat_template_kwargs or {})
    bad = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if bad:
        raise bad_request(f"chat_template_kwargs may not set {bad}", param="chat_template_kwargs")
    if body.continue_final_message:
        kwargs["continue_final_message"] = True
    if plan is not None and plan.tools is not None:
        kwargs["tools"] = plan.tools
    messages = _messages(body)
    try:
        size = sum(len(m["content"]) for m in messages)
        ids = await off_loop(size, state.tokenizer.apply_chat_template, messages,
                             add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                             **kwargs)
    except Exception as exc:  # template errors (jinja, bad roles/order) are the client's
        raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from None
    check_prompt_ids(state, ids, "messages")
    return ids


async def build_subs(state: ServerState, body: ChatCompletionRequest, rid: str,
                 plan: ToolPlan) -> list[SubRequest]:
    check_n(state, body.n)
    grammar = openai_grammar(body)
    if grammar is not None and plan.grammar is not None:
        raise bad_request(f"tool_choice {plan.mode} constrains the output already; drop {grammar.param}",
                          param=grammar.param)
    grammar = await checked(grammar or plan.grammar)
    top = body.top_logprobs
    if top is not None:
        if not body.logprobs and top > 0:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= top <= state.config.engine.max_top_logprobs:
            raise bad_request(f"top_logprobs must be in [0, {state.config.engine.max_top_logprobs}], got {top}",
                              param="top_logprobs")
    ids = await chat_prompt_ids(state, body, plan)
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new = resolve_max_tokens(state, requested, len(ids), None, param=name)
    params = openai_params(state, body, max_new, body.logprobs, top or 0, grammar)
    return fan_out(state, body, [(ids, params)], body.n, sub_rids(rid, body.n),
                   body.include_stop_str_in_output or body.no_stop_trim)


async def _plan(state: ServerState, body: ChatCompletionRequest) -> AsyncIterator[bytes] | Whole:
    head = response_head(state, body, "chatcmpl")
    plan = tool_plan(body, state.tool_parser)
    subs = await build_subs(state, body, head["id"], plan)
    texts = TokenTexts(state)
    if body.stream:
        return _stream(state, subs, head, texts, body.logprobs, include_usage(body), plan, body.pdserve_stream_ids)

    def shape(results: list[Result]) -> dict[str, Any]:
        choices = []
        for r in results:
            message, called = assistant_message(plan, r.text)
            choices.append({
                "index": r.index,
                "message": message,
                "logprobs": chat_logprobs(texts, r.token_ids, r.logprobs, r.top_logprobs) if body.logprobs else None,
                "finish_reason": _finish(plan, r.finish_reason, called),
                "matched_stop": r.matched,
            })
        return dict(head, object="chat.completion", choices=choices, usage=usage(
            len(subs[0].prompt_ids), sum(r.completion_tokens for r in results), results[0].cached_tokens,
            accepted_drafts(results)))

    return Whole(subs, shape)


def assistant_message(plan: ToolPlan, text: str) -> tuple[dict[str, Any], bool]:
    """The assistant message of one choice: content and tool_calls, read by the plan's ToolStream."""
    stream = plan.stream()
    content, calls = "", []
    for e in stream.feed(text) + stream.finish():
        if isinstance(e, Content):
            content += e.text
        elif isinstance(e, Call):
            calls.append({"id": new_call_id(), "type": "function", "function": {"name": e.name, "arguments": e.arguments}})
        else:
            calls[-1]["function"]["arguments"] += e.text
    if not calls:
        return {"role": "assistant", "content": content}, False
    return {"role": "assistant", "content": content or None, "tool_calls": calls}, True


def _finish(plan: ToolPlan, reason: str | None, called: bool) -> str | None:
    """OpenAI: "tool_calls" when the model chose to call (auto); a forced call ends as usual."""
    return "tool_calls" if called and plan.mode == "auto" and reason == "stop" else reason


def _tool_deltas(events: list[Event], calls: list[int], index: int) -> list[dict[str, Any]]:
    """Chunk deltas for a choice's tool-stream events; `calls` counts its calls so far (updated)."""
    deltas = []
    for e in events:
        if isinstance(e, Content):
            if e.text:
                deltas.append({"content": e.text})
        elif isinstance(e, Call):
            calls[index] += 1
            deltas.append({"tool_calls": [{"index": calls[index] - 1, "id": new_call_id(), "type": "function",
                                           "function": {"name": e.name, "arguments": e.arguments}}]})
        else:
            deltas.append({"tool_calls": [{"index": calls[index] - 1, "function": {"arguments": e.text}}]})
    return deltas


async def _stream(state: ServerState, subs: list[SubRequest], head: dict[str, Any], texts: TokenTexts,
                  want_lp: bool, inc_usage: bool, plan: ToolPlan, want_ids: bool = False) -> AsyncIterator[bytes]:
    base = dict(head, object="chat.completion.chunk")
    extra = {"usage": None} if inc_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None,
              matched: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        if finish is not None:
            choice["matched_stop"] = matched
        return frame(dict(base, choices=[choice], **extra))

    # the role deltas go out with the first token (a refusal or failure before it is then an ordinary
    # error answer: server/handler.py's `primed`); a resumed stream had them from its first server
    roles = [chunk(s.index, {"role": "assistant", "content": ""}) for s in subs if s.resume_ids is None]
    completion_tokens = cached = 0
    ends: list[Result] = []  # each sub-request's last delta (its counts)
    streams = {s.index: plan.stream() for s in subs}
    calls = {s.index: 0 for s in subs}
    it = merge(state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            for f in roles:
                yield f
            roles = []
            lp = chat_logprobs(texts, d.token_ids, d.logprobs, d.top_logprobs) if want_lp and d.token_ids else None
            events = streams[d.index].feed(d.text)
            if d.finish_reason is not None:
                events += streams[d.index].finish()
            deltas = _tool_deltas(events, calls, d.index)
            if lp is not None and not deltas:
                deltas = [{"content": ""}]  # logprobs of tokens whose text is held back
            frames = [chunk(d.index, delta, lp=lp if k == 0 else None) for k, delta in enumerate(deltas)]
            if want_ids and d.token_ids:  # a stream that may migrate: its ids lead the event's first frame
                yield with_ids(True, d.token_ids, frames.pop(0) if frames else None)
            for f in frames:
                yield f
            if d.finish_reason is not None:
                yield chunk(d.index, {}, _finish(plan, d.finish_reason, calls[d.index] > 0), matched=d.matched)
                completion_tokens += d.completion_tokens
                cached = d.cached_tokens if d.index == 0 else cached
                ends.append(d)
    if inc_usage:
        yield frame(dict(base, choices=[], usage=usage(len(subs[0].prompt_ids), completion_tokens, cached,
                                                       accepted_drafts(ends))))


router = generation_router("/v1/chat/completions", Route("chat", ChatCompletionRequest, CHAT), _plan)
