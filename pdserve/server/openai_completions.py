"""POST /v1/completions (OpenAI legacy completions; streaming and not).

Per request, after the shared preamble (server/handler.py: the body decoded and validated, the
model checked): tokenize each prompt (or take its ids), fan out prompt × n sub-requests with
their sampling params (seed + choice for n > 1), then either stream `text_completion` chunks
(SSE, usage chunk when `stream_options.include_usage`, then `[DONE]`) or wait for all choices
and answer one JSON body. Choice index = prompt × n + k.
`echo` + `logprobs` scores the prompt too (its first token's logprob is null) and allows
`max_tokens: 0` (score only: what lm-eval-harness's log-likelihood tasks send).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pdserve.contract import sequence_count
from pdserve.server.errors import bad_request
from pdserve.server.generation import Result, SubRequest, merge
from pdserve.server.handler import Route, Whole, fan_out, generation_router, sub_rids
from pdserve.server.openai_common import (
    TokenTexts,
    accepted_drafts,
    completion_logprobs,
    include_usage,
    join_logprobs,
    openai_params,
    prompt_logprobs_block,
    response_head,
    usage,
)
from pdserve.server.params import check_n, check_prompt_ids, encode_text, resolve_max_tokens
from pdserve.server.protocol import CompletionRequest
from pdserve.server.sse import frame, with_ids
from pdserve.server.state import ServerState
from pdserve.server.structured import checked, openai_grammar
from pdserve.server.unsupported import COMPLETIONS


async def _prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > state.config.max_prompts:
        raise bad_request(f"at most {state.config.max_prompts} prompts per request, got {len(items)}", param="prompt")
    ids = [await encode_text(state, p) if isinstance(p, str) else list(p) for p in items]
    for one in ids:
        check_prompt_ids(state, one, "prompt")
    return ids


async def _build(state: ServerState, body: CompletionRequest, rid: str) -> list[SubRequest]:
    check_n(state, body.n)
    k = body.logprobs
    if k is not None and not 0 <= k <= state.config.engine.max_top_logprobs:
        raise bad_request(f"logprobs must be in [0, {state.config.engine.max_top_logprobs}], got {k}",
                          param="logprobs")
    grammar = await checked(openai_grammar(body))
    prompts = []
    for ids in await _prompts(state, body.prompt):
        max_new = resolve_max_tokens(state, body.max_tokens, len(ids), state.config.completion_default_max_tokens,
                                     minimum=0 if body.echo else 1)  # echo + max_tokens 0: score the prompt
        prompts.append((ids, openai_params(state, body, max_new, k is not None, k or 0, grammar)))
    return fan_out(state, body, prompts, body.n, sub_rids(rid, sequence_count(len(prompts), body.n)),
                   body.include_stop_str_in_output or body.no_stop_trim, 0 if body.echo and k is not None else None)


def _choice(index: int, text: str, logprobs: Any, finish: str | None, matched: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "matched_stop": matched}


async def _plan(state: ServerState, body: CompletionRequest) -> AsyncIterator[bytes] | Whole:
    head = dict(response_head(state, body, "cmpl"), object="text_completion")
    subs = await _build(state, body, head["id"])
    echo = {s.index: state.tokenizer.decode(s.prompt_ids, skip_special_tokens=False) for s in subs} if body.echo else {}
    texts = TokenTexts(state)
    want_lp = body.logprobs is not None
    if body.stream:
        return _stream(state, subs, body.n, head, echo, texts, want_lp, include_usage(body), bool(body.logprobs),
                       body.pdserve_stream_ids)

    def shape(results: list[Result]) -> dict[str, Any]:
        choices = []
        prompts = {s.index: s.prompt_ids for s in subs}
        for r in results:
            prefix = echo.get(r.index, "")
            lp = (completion_logprobs(texts, r.token_ids, r.logprobs, r.top_logprobs, len(prefix))[0]
                  if want_lp else None)
            if lp is not None and body.echo:
                block = prompt_logprobs_block(texts, prompts[r.index], r.prompt_logprobs, r.prompt_top_logprobs,
                                              bool(body.logprobs))
                lp = join_logprobs(block, lp) if r.token_ids else block
            choices.append(_choice(r.index, prefix + r.text, lp, r.finish_reason, r.matched))
        prompt_tokens = sum(len(s.prompt_ids) for s in subs if s.index % body.n == 0)
        return dict(head, choices=choices, usage=usage(prompt_tokens, sum(r.completion_tokens for r in results),
                                                       sum(r.cached_tokens for r in results if r.index % body.n == 0),
                                                       accepted_drafts(results)))

    return Whole(subs, shape)


async def _stream(state: ServerState, subs: list[SubRequest], n: int, head: dict[str, Any], echo: dict[int, str],
                  texts: TokenTexts, want_lp: bool, inc_usage: bool, top_wanted: bool,
                  want_ids: bool = False) -> AsyncIterator[bytes]:
    extra = {"usage": None} if inc_usage else {}
    offsets = {s.index: len(echo.get(s.index, "")) for s in subs}
    prompts = {s.index: s.prompt_ids for s in subs}
    held = dict(echo) if want_lp else {}  # echo + logprobs: the echo frame carries the prompt's, once scored
    for index, prefix in sorted(echo.items()):
        if subs[0].resume_ids is not None:
            break  # a resumed stream echoed its prompt from its first server
        if index not in held:
            yield frame(dict(head, choices=[_choice(index, prefix, None, None, None)], **extra))
    completion_tokens = cached = 0
    ends: list[Result] = []  # each sub-request's last delta (its counts)
    it = merge(state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            if d.index in held:
                block = prompt_logprobs_block(texts, prompts[d.index], d.prompt_logprobs, d.prompt_top_logprobs,
                                              top_wanted)
                yield frame(dict(head, choices=[_choice(d.index, held.pop(d.index), block, None, None)], **extra))
            lp = None
            if want_lp and d.token_ids:
                lp, offsets[d.index] = completion_logprobs(texts, d.token_ids, d.logprobs, d.top_logprobs,
                                                           offsets[d.index])
            shown = (frame(dict(head, choices=[_choice(d.index, d.text, lp, d.finish_reason, d.matched)], **extra))
                     if d.text or d.finish_reason is not None or lp is not None else None)
            if shown is not None or (want_ids and d.token_ids):
                yield with_ids(want_ids, d.token_ids, shown)
            if d.finish_reason is not None:
                completion_tokens += d.completion_tokens
                cached += d.cached_tokens if d.index % n == 0 else 0
                ends.append(d)
    if inc_usage:
        prompt_tokens = sum(len(s.prompt_ids) for s in subs if s.index % n == 0)
        yield frame(dict(head, choices=[], usage=usage(prompt_tokens, completion_tokens, cached, accepted_drafts(ends))))


router = generation_router("/v1/completions", Route("completions", CompletionRequest, COMPLETIONS), _plan)
