"""POST /generate: SGLang's native generation endpoint (text or input_ids, single or batched).

Per request: decode + validate the body and its `sampling_params` (SGLang names), build one
sub-request per prompt × n (rid from the body, else random), then either stream SSE chunks
(`{"text", "output_ids", "meta_info", "index"}` with cumulative text and ids, SGLang's default,
then `[DONE]`) or answer one object (a list for batched input or n > 1). `meta_info` holds id,
finish_reason (`{"type": "stop", "matched": ...}`, `{"type": "length", "length": N}`,
`{"type": "abort", "message": ...}`), prompt/completion/cached token counts, e2e latency and,
with `return_logprob`, `output_token_logprobs` / `output_top_logprobs` as [logprob, id, text].
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from pdserve.engine.messages import TopLogprob
from pdserve.server.errors import bad_request, from_validation_error
from pdserve.server.generation import Result, SubRequest, collect, merge, until_disconnect
from pdserve.server.openai_common import TokenTexts
from pdserve.server.params import (
    pd_bootstrap,
    check_int,
    check_n,
    check_prompt_ids,
    decode_json_object,
    encode_text,
    make_params,
    resolve_max_tokens,
    stop_ids,
    stop_list,
    with_seed,
)
from pdserve.server.protocol import GenerateRequest, NativeSamplingParams
from pdserve.server.sse import SSEResponse, frame
from pdserve.server.structured import checked, native_grammar
from pdserve.server.state import ServerState, get_state

router = APIRouter()


async def _prompts(state: ServerState, body: GenerateRequest) -> tuple[list[list[int]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("send exactly one of 'text' and 'input_ids'", param="text")
    if body.text is not None:
        batched = isinstance(body.text, list)
        texts = body.text if isinstance(body.text, list) else [body.text]
        ids = [await encode_text(state, t) if t else [] for t in texts]
        param = "text"
    else:
        raw = body.input_ids or []
        batched = bool(raw) and isinstance(raw[0], list)
        ids = [list(x) for x in raw] if batched else [list(raw)]  # type: ignore[arg-type]
        param = "input_ids"
    if not ids:
        raise bad_request(f"{param} is an empty batch", param=param)
    if len(ids) > state.config.max_prompts:
        raise bad_request(f"at most {state.config.max_prompts} prompts per request, got {len(ids)}", param=param)
    for one in ids:
        check_prompt_ids(state, one, param)
    return ids, batched


async def _build(state: ServerState, body: GenerateRequest) -> tuple[list[SubRequest], bool]:
    try:
        sp = NativeSamplingParams.model_validate(body.sampling_params or {})
    except ValidationError as exc:
        raise from_validation_error(exc, prefix="sampling_params") from None
    check_n(state, sp.n, "sampling_params.n")
    check_int(body.top_logprobs_num, "top_logprobs_num", 0, state.config.engine.max_top_logprobs)
    grammar = await checked(native_grammar(sp))
    prompts, batched = await _prompts(state, body)
    total = len(prompts) * sp.n
    rids = _rids(body.rid, total)
    boot = pd_bootstrap(state, body, total)
    subs = []
    for p, ids in enumerate(prompts):
        max_new = resolve_max_tokens(state, sp.max_new_tokens, len(ids), state.config.generate_default_max_tokens,
                                     param="sampling_params.max_new_tokens", minimum=0)
        params = make_params(
            state, "sampling_params.", max_new_tokens=max_new, min_new_tokens=sp.min_new_tokens, temperature=sp.temperature,
            top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p, repetition_penalty=sp.repetition_penalty,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty, seed=sp.seed,
            stop=stop_list(state, sp.stop, "sampling_params.stop"),
            stop_token_ids=stop_ids(state, sp.stop_token_ids, "sampling_params.stop_token_ids"),
            ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens,
            logprobs=body.return_logprob, top_logprobs=body.top_logprobs_num if body.return_logprob else 0,
            grammar=grammar)
        for j in range(sp.n):
            index = p * sp.n + j
            subs.append(SubRequest(index, rids[index], ids, with_seed(params, j), sp.no_stop_trim, boot))
    return subs, batched or sp.n > 1


def _rids(rid: str | list[str] | None, total: int) -> list[str]:
    if isinstance(rid, list):
        if len(rid) != total or len(set(rid)) != total or not all(rid):
            raise bad_request(f"rid must list {total} distinct non-empty ids", param="rid")
        return rid
    base = rid or uuid.uuid4().hex
    return [base] if total == 1 else [f"{base}-{k}" for k in range(total)]


def finish_reason(reason: str | None, matched: int | str | None, completion_tokens: int) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    if reason == "abort":
        return {"type": "abort", "message": matched if isinstance(matched, str) else "aborted"}
    return {"type": reason, "matched": matched}


def _lp_triples(texts: TokenTexts | None, ids: list[int], logprobs: list[float] | None) -> list[list[Any]]:
    lps = logprobs or []
    return [[lps[k] if k < len(lps) else None, tid, texts(tid) if texts else None] for k, tid in enumerate(ids)]


def _top_triples(texts: TokenTexts | None, top: list[list[TopLogprob]] | None) -> list[list[list[Any]]]:
    return [[[t.logprob, t.token_id, texts(t.token_id) if texts else None] for t in row] for row in top or []]


def _meta(r: Result, want_lp: bool, top_n: int, texts: TokenTexts | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": finish_reason(r.finish_reason, r.matched, r.completion_tokens),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "e2e_latency": r.e2e_latency,
    }
    if want_lp:
        meta["output_token_logprobs"] = _lp_triples(texts, r.token_ids, r.logprobs)
        if top_n > 0:
            meta["output_top_logprobs"] = _top_triples(texts, r.top_logprobs)
    return meta


@router.post("/generate")
async def generate(request: Request) -> Response:
    state = get_state(request)
    state.metrics.request("generate")
    body = GenerateRequest.model_validate(decode_json_object(await request.body()))
    subs, many = await _build(state, body)
    texts = TokenTexts(state) if body.return_text_in_logprobs else None
    if body.stream:
        return SSEResponse(_stream(state, subs, body, texts))
    results = await until_disconnect(request, collect(state, subs))
    outs = [{"text": r.text, "output_ids": r.token_ids, "meta_info": _meta(r, body.return_logprob,
                                                                            body.top_logprobs_num, texts),
             **({"index": r.index} if many else {})} for r in results]
    return Response(msgspec.json.encode(outs if many else outs[0]), media_type="application/json")


async def _stream(state: ServerState, subs: list[SubRequest], body: GenerateRequest,
                  texts: TokenTexts | None) -> AsyncIterator[bytes]:
    acc = {s.index: Result(s.index, s.rid, prompt_tokens=len(s.prompt_ids)) for s in subs}
    many = len(subs) > 1
    it = merge(state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            r = acc[d.index]
            r.add(d)
            if not d.text and not d.token_ids and d.finish_reason is None:
                continue
            if d.finish_reason is None:
                r.completion_tokens = len(r.token_ids)
            out = {"text": r.text, "output_ids": r.token_ids,
                   "meta_info": _meta(r, body.return_logprob, body.top_logprobs_num, texts)}
            if many:
                out["index"] = d.index
            yield frame(out)
