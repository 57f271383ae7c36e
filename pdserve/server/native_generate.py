"""POST /generate: SGLang's native generation endpoint (text or input_ids, single or batched).

Per request, after the shared preamble (server/handler.py: the body decoded and validated):
validate its `sampling_params` (SGLang names), build one sub-request per prompt × n (rid from
the body, else random), then either stream SSE chunks (`{"text", "output_ids", "meta_info",
"index"}` with cumulative text and ids, SGLang's default, then `[DONE]`) or answer one object
(a list for batched input or n > 1). `meta_info` holds id, finish_reason (`{"type": "stop",
"matched": ...}`, `{"type": "length", "length": N}`, `{"type": "abort", "message": ...}`),
prompt/completion/cached token counts, e2e latency and, with `return_logprob`,
`output_token_logprobs` / `output_top_logprobs` as [logprob, id, text] (and, with
`logprob_start_len` >= 0, the prompt's `input_token_logprobs` / `input_top_logprobs` from that
position; position 0 has no context: null).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from pdserve.contract import sequence_count
from pdserve.engine.messages import TopLogprob
from pdserve.server.errors import bad_request, from_validation_error
from pdserve.server.generation import Result, SubRequest, merge, resumed_result
from pdserve.server.handler import Route, Whole, fan_out, generation_router, sub_rids
from pdserve.server.openai_common import TokenTexts
from pdserve.server.params import (
    INT_LIMIT,
    check_int,
    check_n,
    check_prompt_ids,
    drop_nulls,
    encode_text,
    make_params,
    resolve_max_tokens,
    stop_ids,
    stop_list,
)
from pdserve.server.protocol import GenerateRequest, NativeSamplingParams
from pdserve.server.sse import frame, with_ids
from pdserve.server.state import ServerState
from pdserve.server.structured import checked, native_grammar
from pdserve.server.unsupported import GENERATE, GENERATE_SAMPLING, reject_unsupported


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
        raw_sp = drop_nulls(body.sampling_params or {})
        reject_unsupported(raw_sp, GENERATE_SAMPLING, "sampling_params.")
        sp = NativeSamplingParams.model_validate(raw_sp)
    except ValidationError as exc:
        raise from_validation_error(exc, prefix="sampling_params") from None
    check_n(state, sp.n, "sampling_params.n")
    check_int(body.top_logprobs_num, "top_logprobs_num", 0, state.config.engine.max_top_logprobs)
    check_int(body.logprob_start_len, "logprob_start_len", -1, INT_LIMIT)
    score = body.logprob_start_len if body.return_logprob and body.logprob_start_len >= 0 else None
    grammar = await checked(native_grammar(sp))
    prompts, batched = await _prompts(state, body)
    planned = []
    for ids in prompts:
        max_new = resolve_max_tokens(state, sp.max_new_tokens, len(ids), state.config.generate_default_max_tokens,
                                     param="sampling_params.max_new_tokens", minimum=0)
        planned.append((ids, make_params(
            state, "sampling_params.", max_new_tokens=max_new, min_new_tokens=sp.min_new_tokens,
            temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty, frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty, seed=sp.seed,
            stop=stop_list(state, sp.stop, "sampling_params.stop"),
            stop_token_ids=stop_ids(state, sp.stop_token_ids, "sampling_params.stop_token_ids"),
            ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens,
            logprobs=body.return_logprob, top_logprobs=body.top_logprobs_num if body.return_logprob else 0,
            logit_bias=sp.logit_bias, grammar=grammar)))
    subs = fan_out(state, body, planned, sp.n, _rids(body.rid, sequence_count(len(prompts), sp.n)), sp.no_stop_trim, score)
    return subs, batched or sp.n > 1


def _rids(rid: str | list[str] | None, total: int) -> list[str]:
    if isinstance(rid, list):
        if len(rid) != total or len(set(rid)) != total or not all(rid):
            raise bad_request(f"rid must list {total} distinct non-empty ids", param="rid")
        return rid
    return sub_rids(rid or uuid.uuid4().hex, total)


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


def _meta(r: Result, want_lp: bool, top_n: int, texts: TokenTexts | None,
          prompt: tuple[list[int], int] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": finish_reason(r.finish_reason, r.matched, r.completion_tokens),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "e2e_latency": r.e2e_latency,
    }
    if r.spec_verify_ct:  # speculative decoding (SGLang's spec_verify_ct) and the drafts it accepted
        meta["spec_verify_ct"], meta["spec_accepted_tokens"] = r.spec_verify_ct, r.spec_accepted_tokens
    if want_lp:
        meta["output_token_logprobs"] = _lp_triples(texts, r.token_ids, r.logprobs)
        if top_n > 0:
            meta["output_top_logprobs"] = _top_triples(texts, r.top_logprobs)
        if prompt is not None:  # (a PD decode has none: the router prepends the prefill's)
            ids, start = prompt
            scored = r.prompt_logprobs is not None
            meta["input_token_logprobs"] = _lp_triples(texts, ids[start:], r.prompt_logprobs) if scored else []
            if top_n > 0:
                rows = [row or None for row in r.prompt_top_logprobs or []] if scored else []
                meta["input_top_logprobs"] = [None if row is None else t for row, t in
                                              zip(rows, _top_triples(texts, [row or [] for row in rows]))]
    return meta


def _scored_prompts(subs: list[SubRequest]) -> dict[int, tuple[list[int], int]]:
    return {s.index: (s.prompt_ids, s.score_from) for s in subs if s.score_from is not None}


async def _plan(state: ServerState, body: GenerateRequest) -> AsyncIterator[bytes] | Whole:
    subs, many = await _build(state, body)
    texts = TokenTexts(state) if body.return_text_in_logprobs else None
    if body.stream:
        return _stream(state, subs, body, texts)
    prompts = _scored_prompts(subs)

    def shape(results: list[Result]) -> object:
        outs = [{"text": r.text, "output_ids": r.token_ids,
                 "meta_info": _meta(r, body.return_logprob, body.top_logprobs_num, texts, prompts.get(r.index)),
                 **({"index": r.index} if many else {})} for r in results]
        return outs if many else outs[0]

    return Whole(subs, shape)


async def _stream(state: ServerState, subs: list[SubRequest], body: GenerateRequest,
                  texts: TokenTexts | None) -> AsyncIterator[bytes]:
    acc = {s.index: resumed_result(state, s) for s in subs}
    many = len(subs) > 1
    prompts = _scored_prompts(subs)
    it = merge(state, subs)
    async with contextlib.aclosing(it):
        async for d in it:
            r = acc[d.index]
            r.add(d)
            if not d.text and not d.token_ids and d.finish_reason is None and d.prompt_logprobs is None:
                continue
            if d.finish_reason is None:
                r.completion_tokens = len(r.token_ids)
            out = {"text": r.text, "output_ids": r.token_ids,
                   "meta_info": _meta(r, body.return_logprob, body.top_logprobs_num, texts, prompts.get(d.index))}
            if many:
                out["index"] = d.index
            yield with_ids(body.pdserve_stream_ids, d.token_ids, frame(out))


router = generation_router("/generate", Route("generate", GenerateRequest, GENERATE), _plan)
