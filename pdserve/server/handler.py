"""The preamble every route shares, so that each generation route keeps only what is its own.

A route declares a `Route` (its metrics label, pydantic body model and table of fields
pdserve knows but does not implement); a generation route adds a `plan` coroutine, its own
part, and gets its endpoint from `generation_router(path, route, plan)`, which runs each
request through `handle`:
  1. `read_body`: count the request under `route.kind`, decode the raw body as a JSON object
     (400 `invalid_json` otherwise), refuse unsupported fields (400 naming the field), validate
     the body with the model (a ValidationError: 400 naming the field) and check `model` (404);
     then admission (server/elastic.py: 503 while the server drains, 409 for a stale role epoch);
  2. `plan(state, body)`: the route's prompts and sampling params, its sub-requests (built by
     `fan_out`), and either the SSE frames of a stream or a `Whole` answer;
  3. a stream goes out as an `SSEResponse` once its first frame is there (`primed`: an error
     before it is an ordinary error answer; one mid-stream: an error frame, then `[DONE]`); a
     whole answer runs every sub-request to its end (`collect`; the client going away aborts
     them: 499) and answers the JSON that `Whole.shape` makes of the results (the router may ask
     to see its progress: `progress`). Both carry the request's prompt tokens in a header
     (contract.PROMPT_TOKENS_HEADER; `fan_out` counts them), a whole answer also its completion
     tokens: what a router's planner metrics read.
Every failure is raised (`APIError`, ValidationError) to the app's error handlers.

`fan_out` turns prompts x n into sub-requests alike for every route: choice j of prompt p is
sequence p * n + j (its choice index), with its own rid, its seed offset j, its PD bootstrap
(none for a score-only sequence: nothing to decode), its dp rank and, for j > 0, the rid of
its prompt's first copy, whose prompt pages it shares; all of them the request's priority and
TTFT deadline. Admission control (server/admission.py) admits the request or refuses it (503)
there, before anything reaches the engine. `handle` also keeps the request's trace headers for
its spans (server/traces.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from pdserve.contract import COMPLETION_TOKENS_HEADER, PROMPT_TOKENS_HEADER, STATUS_COMMENT, STREAM_IDS, sequence_count
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.errors import APIError, error_body
from pdserve.server.generation import Result, SubRequest, collect, merge, resumed_result, until_disconnect
from pdserve.server.params import (check_model, deadline, decode_json_object, dp_rank, pd_bootstrap, priority,
                                   resume_ids, with_seed)
from pdserve.server.protocol import _BootstrapFields
from pdserve.server.sse import SSEResponse, frame, with_ids
from pdserve.server.state import ServerState, get_state
from pdserve.server.traces import REQUEST
from pdserve.server.unsupported import reject_unsupported
from pdserve.tracing import TRACEPARENT

B = TypeVar("B", bound=BaseModel)
_prompt_tokens: ContextVar[int] = ContextVar("prompt_tokens", default=0)  # set by fan_out in the handling task


@dataclass(frozen=True)
class Route(Generic[B]):
    """What a route's body is and how it is counted: step 1 of the module docstring."""

    kind: str | None  # label of the request counter (None: not counted)
    model: type[B]
    unsupported: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Whole:
    """A non-streaming answer: run `subs` to their end, then `shape(results)` is the JSON body."""

    subs: list[SubRequest]
    shape: Callable[[list[Result]], object]


# a route's own part: the validated body -> the SSE frames of a stream, or a whole answer
Plan = Callable[[ServerState, B], Awaitable["AsyncIterator[bytes] | Whole"]]


async def read_body(request: Request, route: Route[B]) -> tuple[ServerState, B]:
    """Step 1 of the module docstring: the server state and the validated body."""
    state = get_state(request)
    if route.kind is not None:
        state.metrics.request(route.kind)
    data = decode_json_object(await request.body())
    reject_unsupported(data, route.unsupported)
    body = route.model.model_validate(data)
    check_model(state, getattr(body, "model", None))  # /generate's body names no model
    return state, body


def generation_router(path: str, route: Route[B], plan: Plan[B]) -> APIRouter:
    """An APIRouter whose one POST `path` runs each request through `handle(request, route, plan)`."""
    router = APIRouter()

    @router.post(path, name=route.kind)
    async def endpoint(request: Request) -> Response:
        return await handle(request, route, plan)

    return router


async def handle(request: Request, route: Route[B], plan: Plan[B]) -> Response:
    REQUEST.set((request.headers.get(TRACEPARENT), request.headers.get("x-request-id")))
    state, body = await read_body(request, route)
    request.app.state.elastic.admit(state, body)
    answer = await plan(state, body)
    counts = {PROMPT_TOKENS_HEADER: str(_prompt_tokens.get())}
    if not isinstance(answer, Whole):
        return await primed(request, answer, counts)
    if getattr(body, STREAM_IDS) and len(answer.subs) == 1 and state.config.disagg.mode != "prefill":
        return await progress(request, state, answer, counts)
    results = await until_disconnect(request, collect(state, answer.subs))
    counts[COMPLETION_TOKENS_HEADER] = str(sum(r.completion_tokens for r in results))
    return json_response(answer.shape(results), headers=counts)


async def _first(frames: AsyncIterator[bytes]) -> bytes | None:
    async for f in frames:
        return f
    return None


async def primed(request: Request, frames: AsyncIterator[bytes], headers: dict[str, str]) -> Response:
    """A stream whose head goes out with its first frame (its first token): a refusal or failure
    before it (a deadline drop, a failed KV transfer, a dead engine) is an ordinary error answer
    with its own status, which a router can act on; the client going away meanwhile aborts it."""
    try:
        first = await until_disconnect(request, _first(frames))
    except BaseException:
        await frames.aclose()  # type: ignore[attr-defined]
        raise

    async def rest() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
            async for f in frames:
                yield f
        finally:
            await frames.aclose()  # type: ignore[attr-defined]

    return SSEResponse(rest(), headers=headers)


async def progress(request: Request, state: ServerState, whole: Whole, headers: dict[str, str]) -> Response:
    """A whole answer whose progress is streamed (the body asked for STREAM_IDS without `stream`:
    pdserve's router, so that it can move the request if this server dies): once its first
    token came (an error before it is an ordinary error answer), an SSE stream of ids comments,
    then one `data:` frame holding the whole answer (an error later: a STATUS_COMMENT line with
    its status, then its error frame), then `[DONE]`. A resumed request's answer includes the
    ids it resumed from."""
    sub = whole.subs[0]
    acc = resumed_result(state, sub)
    it = merge(state, whole.subs)
    try:
        first = await until_disconnect(request, anext(it))
    except BaseException:
        await it.aclose()  # type: ignore[attr-defined]
        raise

    async def frames() -> AsyncIterator[bytes]:
        d = first
        try:
            while True:
                acc.add(d)
                if d.token_ids:
                    yield with_ids(True, d.token_ids, None)
                if d.finish_reason is not None:
                    break
                d = await anext(it)
            yield frame(whole.shape([acc]))
        except APIError as exc:
            yield STATUS_COMMENT + str(exc.status).encode() + b"\n" + frame(
                error_body(exc.status, exc.message, exc.param, exc.code, exc.type))
        finally:
            await it.aclose()

    return SSEResponse(frames(), headers=headers)


def json_response(obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json", headers=headers)


def sub_rids(base: str, total: int) -> list[str]:
    """The rid of each of `total` sequences: `base` alone, else `base-0`, `base-1`, ..."""
    return [base] if total == 1 else [f"{base}-{k}" for k in range(total)]


def fan_out(state: ServerState, body: _BootstrapFields, prompts: list[tuple[list[int], SamplingParams]], n: int,
            rids: list[str], include_stop: bool = False, score_from: int | None = None) -> list[SubRequest]:
    """The sub-requests of `prompts` (ids, params) x `n` (see the module docstring); `rids` has
    one id per sequence."""
    total = sequence_count(len(prompts), n)
    _prompt_tokens.set(sum(len(ids) for ids, _ in prompts))
    boots = pd_bootstrap(state, body, len(prompts), n)
    level, due = priority(state, body), deadline(body)
    subs = []
    for p, (ids, params) in enumerate(prompts):
        max_new = params.max_new_tokens
        resume = resume_ids(state, body, total, max_new)
        rank = dp_rank(state, body)
        for j in range(n):
            k = p * n + j
            subs.append(SubRequest(k, rids[k], ids, with_seed(params, j), include_stop,
                                   boots[k] if boots and max_new else None, rids[p * n] if j else None,
                                   score_from, resume, rank, level, due))
    remote = state.config.disagg.mode == "decode"  # a PD decode computes none of a PD prompt
    state.admission.admit(state.client.brief, [(s.rid, len(s.prompt_ids) + len(s.resume_ids or ()))
                                               for s in subs if not (remote and s.bootstrap)], due)
    return subs
