"""Running engine requests from a handler: text deltas, stop strings, fan-out, disconnects.

A handler turns its body into `SubRequest`s (one per prompt × n), then either
- streams: `merge(state, subs)` yields `Delta`s as they come, from all sub-requests at once; or
- collects: `collect(state, subs)` returns one `Result` per sub-request.
Each sub-request (`run_one`) sends a GenerateReq through the EngineClient, feeds token ids to a
`TextStream` (incremental detokenization; a possible stop string is held back, the engine's
matched one cut), records metrics, and ends on the engine's finished TokenOut. Closing any of these iterators early (client
gone) aborts every sub-request still running. `until_disconnect` guards non-streaming handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from pdserve.contract import STALE_EPOCH
from pdserve.engine.messages import Bootstrap, GenerateReq, TokenOut, TopLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.engine_client import DuplicateRequestError, EngineDeadError
from pdserve.server.errors import APIError
from pdserve.server.metrics import RequestTimer
from pdserve.server.state import ServerState
from pdserve.server.text_stream import TextStream
from pdserve.server.traces import trace_request

T = TypeVar("T")


@dataclass(frozen=True)
class SubRequest:
    index: int  # choice index in the response
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    include_stop: bool = False
    bootstrap: Bootstrap | None = None  # a PD request: where its KV comes from / goes to
    share_with: str | None = None  # rid of the first of the n copies of this prompt (shares its pages)
    score_from: int | None = None  # score the prompt from this position (echo + logprobs); None: no
    resume_ids: tuple[int, ...] | None = None  # a migrated stream: output already delivered elsewhere
    dp_rank: int | None = None  # the request's data_parallel_rank (SGLang's field): which dp rank serves it
    sched_priority: int = 0  # the request's priority: lower first (--enable-priority-scheduling)
    deadline: float | None = None  # wall clock by which its first token is due (contract.TTFT_DEADLINE)


@dataclass
class Result:
    """What one sub-request produced: all of it so far (`collect` sums the deltas with `add`).

    A `Delta` is the same record holding one engine step's share (what `run_one` and `merge`
    yield): its text and token ids are new ones; the counts, latency and `matched` are set on
    the last delta only (the one with `finish_reason`), prompt logprobs on the first that has
    them."""

    index: int  # choice index in the response
    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: str | None = None
    matched: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    e2e_latency: float = 0.0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    spec_verify_ct: int = 0  # speculative decoding: verify forwards, accepted drafts (the last delta)
    spec_accepted_tokens: int = 0

    def add(self, d: Delta) -> None:
        if d.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = d.prompt_logprobs, d.prompt_top_logprobs
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.logprobs)
        if d.top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.extend(d.top_logprobs)
        if d.finish_reason is not None:
            self.finish_reason, self.matched = d.finish_reason, d.matched
            self.prompt_tokens, self.completion_tokens = d.prompt_tokens, d.completion_tokens
            self.cached_tokens, self.e2e_latency = d.cached_tokens, d.e2e_latency
            self.spec_verify_ct, self.spec_accepted_tokens = d.spec_verify_ct, d.spec_accepted_tokens


Delta = Result  # one engine step's share of a Result (see its docstring)


def engine_error(out: TokenOut) -> APIError:
    """The engine's error answer to a request as an APIError (a deadline drop carries Retry-After)."""
    code = out.error_code or ("kv_transfer_failed" if out.error_status >= 500
                              else STALE_EPOCH if out.error_status == 409 else None)
    headers = {"Retry-After": "1"} if code == "deadline_exceeded" else None
    return APIError(out.error_status, out.error or "failed", code=code, headers=headers)


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, DuplicateRequestError):
        return APIError(400, str(exc), param="rid")
    return APIError(503, f"the engine is unavailable: {exc}", code="engine_unavailable")


async def run_one(state: ServerState, sub: SubRequest) -> AsyncIterator[Delta]:
    """Deltas of one engine request; the last one has `finish_reason` set."""
    timer = RequestTimer(state.metrics, sub.rid)
    text = TextStream(state.tokenizer, sub.prompt_ids, sub.params.stop,
                      sub.params.skip_special_tokens, sub.include_stop)
    resumed = sub.resume_ids or ()
    text.add(resumed)  # a migrated stream: the text state its first server had (not re-sent)
    count = len(resumed)
    finished = False
    req = GenerateReq(rid=sub.rid, input_ids=sub.prompt_ids, params=sub.params, bootstrap=sub.bootstrap,
                     share_prompt_with=sub.share_with, return_prompt_logprobs=sub.score_from is not None,
                     prompt_logprobs_from=sub.score_from or 0,
                     output_ids=list(resumed), data_parallel_rank=sub.dp_rank, priority=sub.sched_priority,
                     deadline=sub.deadline)
    state.admission.started(sub.rid)  # its prompt tokens count as queued until its first token
    try:
        outs = state.client.generate(req)
        async with contextlib.aclosing(outs):
            async for out in outs:
                if out.error is not None:
                    finished = True  # rejected by the engine, or its PD transfer failed
                    raise engine_error(out)
                if out.token_ids or out.finished:
                    state.admission.done(sub.rid)
                ids = out.token_ids
                timer.tokens(len(ids))
                count += len(ids)
                piece = text.add(ids)
                if not out.finished:
                    if piece or ids or out.prompt_logprobs is not None:
                        yield Delta(sub.index, sub.rid, piece, ids, out.logprobs, out.top_logprobs,
                                    prompt_logprobs=out.prompt_logprobs, prompt_top_logprobs=out.prompt_top_logprobs)
                    continue
                piece += text.finish(out.matched_stop)
                reason, matched = out.finish_reason, out.matched_stop
                prompt = out.prompt_tokens or len(sub.prompt_ids)
                finished = True
                e2e = timer.finish(out, prompt, count)
                trace_request(state, sub.rid, sub.sched_priority, sub.bootstrap is not None, out, e2e)
                yield Delta(sub.index, sub.rid, piece, ids, out.logprobs, out.top_logprobs, reason, matched,
                            prompt, count, out.cached_tokens, e2e, out.prompt_logprobs, out.prompt_top_logprobs,
                            out.spec_verify_ct, out.spec_accepted_tokens)
                return
    except (EngineDeadError, DuplicateRequestError) as exc:
        raise _engine_error(exc) from None
    finally:
        state.admission.done(sub.rid)
        if not finished:  # client gone, error or cancellation: count it as aborted
            timer.finish(TokenOut(rid=sub.rid, token_ids=[], finish_reason="abort"), len(sub.prompt_ids), count)


def resumed_result(state: ServerState, s: SubRequest) -> Result:
    """A request's result so far: empty, or a migrated request's delivered ids and their text."""
    r = Result(s.index, s.rid, prompt_tokens=len(s.prompt_ids))
    if s.resume_ids is not None:
        text = TextStream(state.tokenizer, s.prompt_ids, s.params.stop, s.params.skip_special_tokens, s.include_stop)
        r.text, r.token_ids = text.add(s.resume_ids), list(s.resume_ids)
    return r


_DONE = object()


async def merge(state: ServerState, subs: list[SubRequest]) -> AsyncIterator[Delta]:
    """Deltas of all `subs` in arrival order; closing it aborts those still running."""
    if len(subs) == 1:
        it = run_one(state, subs[0])
        async with contextlib.aclosing(it):
            async for d in it:
                yield d
        return
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(sub: SubRequest) -> None:
        it = run_one(state, sub)
        try:
            async with contextlib.aclosing(it):
                async for d in it:
                    queue.put_nowait(d)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in subs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(state: ServerState, subs: list[SubRequest]) -> list[Result]:
    results = [Result(s.index, s.rid) for s in subs]
    by_index = {s.index: r for s, r in zip(subs, results)}
    it = merge(state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            by_index[d.index].add(d)
    return results


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (so its engine requests abort) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if not task.done() or task.cancelled():
        with contextlib.suppress(BaseException):
            await task
        raise APIError(499, "client closed the request", code="client_closed")
    return task.result()
