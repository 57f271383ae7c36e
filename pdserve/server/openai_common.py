"""Pieces shared by /v1/completions and /v1/chat/completions: ids, sampling params from the
OpenAI fields, usage blocks, and the two logprobs shapes (completions' and chat's).

Pure helpers: called by the handlers while they build the response head and sub-requests,
and while they turn `Delta`s / `Result`s into OpenAI JSON, one call per chunk or response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from pdserve.engine.messages import TopLogprob
from pdserve.engine.sampling_params import GrammarSpec, SamplingParams
from pdserve.server.generation import Result
from pdserve.server.params import make_params, stop_ids, stop_list
from pdserve.server.protocol import _SamplingFields
from pdserve.server.state import ServerState


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_head(state: ServerState, body: _SamplingFields, prefix: str) -> dict[str, Any]:
    """`id`, `created` and `model` of a response; a resumed stream (migrated by the router)
    keeps the id and time its first server put in its chunks."""
    resumed = body.pdserve_resume_ids is not None and body.pdserve_response_id
    return {"id": body.pdserve_response_id if resumed else new_id(prefix),
            "created": body.pdserve_created or int(time.time()), "model": body.model or state.model_name}


def include_usage(body: _SamplingFields) -> bool:
    """A stream ends with a usage chunk (`stream_options.include_usage`)."""
    return body.stream_options is not None and body.stream_options.include_usage


def openai_params(state: ServerState, body: _SamplingFields, max_new_tokens: int, logprobs: bool,
                  top_logprobs: int, grammar: GrammarSpec | None = None) -> SamplingParams:
    return make_params(
        state,
        max_new_tokens=max_new_tokens,
        min_new_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        stop=stop_list(state, body.stop),
        stop_token_ids=stop_ids(state, body.stop_token_ids),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        logit_bias=body.logit_bias,
        grammar=grammar,
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          accepted_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `accepted_tokens` (drafts speculative decoding accepted; None: it did not
    run) as completion_tokens_details.accepted_prediction_tokens."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if accepted_tokens is not None:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted_tokens}
    return out


def accepted_drafts(results: Sequence[Result]) -> int | None:
    """Drafts accepted over `results` (usage's accepted_prediction_tokens); None if none speculated."""
    return sum(r.spec_accepted_tokens for r in results) if any(r.spec_verify_ct for r in results) else None


class TokenTexts:
    """Token id → its text (special tokens kept), cached; for logprobs entries."""

    def __init__(self, state: ServerState) -> None:
        self.tokenizer = state.tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text


def completion_logprobs(texts: TokenTexts, ids: list[int], logprobs: list[float] | None,
                        top: list[list[TopLogprob]] | None, offset: int) -> tuple[dict[str, Any], int]:
    """Completions-style logprobs for `ids`; `offset` is the text offset of the first token.
    Returns the block and the offset after the last token."""
    tokens = [texts(i) for i in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    block = {
        "tokens": tokens,
        "token_logprobs": list(logprobs or [None] * len(ids)),
        "top_logprobs": [{texts(t.token_id): t.logprob for t in row} for row in top] if top is not None else None,
        "text_offset": offsets,
    }
    return block, offset


def prompt_logprobs_block(texts: TokenTexts, ids: list[int], logprobs: list[float | None] | None,
                          top: list[list[TopLogprob]] | None, want_top: bool) -> dict[str, Any]:
    """Completions-style logprobs of an echoed prompt (offsets from 0): the first token has no
    context, so its logprob and top alternatives are null (as OpenAI and vLLM answer)."""
    block, _ = completion_logprobs(texts, ids, None, None, 0)
    lps = list(logprobs or [])
    block["token_logprobs"] = [lps[k] if k < len(lps) else None for k in range(len(ids))]
    if want_top:
        rows = list(top or [])
        block["top_logprobs"] = [({texts(t.token_id): t.logprob for t in rows[k]} if k < len(rows) and rows[k] else None)
                                 for k in range(len(ids))]
    return block


def join_logprobs(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    """The echoed prompt's block followed by the generated tokens' block."""
    out = {k: list(head[k]) + list(tail[k]) for k in ("tokens", "token_logprobs", "text_offset")}
    out["top_logprobs"] = (list(head["top_logprobs"]) + list(tail["top_logprobs"] or [{}] * len(tail["tokens"]))
                           if head["top_logprobs"] is not None else None)
    return out


def _entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(texts: TokenTexts, ids: list[int], logprobs: list[float] | None,
                  top: list[list[TopLogprob]] | None) -> dict[str, Any]:
    content = []
    for k, tid in enumerate(ids):
        item = _entry(texts(tid), logprobs[k] if logprobs and k < len(logprobs) else None)
        row = top[k] if top is not None and k < len(top) else []
        item["top_logprobs"] = [_entry(texts(t.token_id), t.logprob) for t in row]
        content.append(item)
    return {"content": content, "refusal": None}
