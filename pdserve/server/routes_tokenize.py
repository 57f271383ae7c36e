"""/tokenize, /detokenize (vLLM's and SGLang's shapes), /version and /v1/models/{id}.

Stateless handlers over the front's tokenizer: no engine round trip. `/tokenize` takes a
`prompt` (a string, or SGLang's list of strings) or chat `messages` (rendered with the model's
chat template exactly as /v1/chat/completions renders them) and answers `tokens`, `count`
and `max_model_len`; `/detokenize` answers the text of `tokens` as `prompt` (vLLM) and
`text` (SGLang). An unknown model id is a 404 `model_not_found`.
"""

from __future__ import annotations

from typing import Any, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from pdserve.server.errors import bad_request
from pdserve.server.handler import Route, json_response, read_body
from pdserve.server.openai_chat import chat_prompt_ids
from pdserve.server.params import check_model, encode_text
from pdserve.server.protocol import ChatCompletionRequest
from pdserve.server.routes_admin import VERSION, model_card
from pdserve.server.state import get_state

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: Union[str, list[str], None] = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


_TOKENIZE = Route(None, TokenizeRequest)
_DETOKENIZE = Route(None, DetokenizeRequest)


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(request: Request) -> Response:
    state, body = await read_body(request, _TOKENIZE)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of 'prompt' and 'messages'", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest.model_validate({
            "messages": body.messages, "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message,
            "chat_template_kwargs": body.chat_template_kwargs})
        ids = await chat_prompt_ids(state, chat)
        if body.add_special_tokens and state.tokenizer.bos_token_id is not None and ids[:1] != [state.tokenizer.bos_token_id]:
            ids = [state.tokenizer.bos_token_id, *ids]
        batch = [ids]
    else:
        special = body.add_special_tokens is not False
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt or [])
        batch = [state.tokenizer.encode(t, add_special_tokens=special) if len(t) < 8192
                 else await encode_text(state, t) for t in texts]
    out: dict[str, Any] = {"count": sum(len(t) for t in batch), "max_model_len": state.max_model_len,
                           "tokens": batch[0] if isinstance(body.prompt, str) or body.messages is not None else batch}
    if body.return_token_strs:
        strs = [[state.tokenizer.decode([i], skip_special_tokens=False) for i in t] for t in batch]
        out["token_strs"] = strs[0] if not isinstance(body.prompt, list) else strs
    return json_response(out)


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(request: Request) -> Response:
    state, body = await read_body(request, _DETOKENIZE)
    bad = next((t for t in body.tokens if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (valid ids are 0..{state.vocab_size - 1})",
                          param="tokens")
    text = state.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return json_response({"prompt": text, "text": text})


@router.get("/version")
async def version(request: Request) -> Response:
    return json_response({"version": VERSION})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    state = get_state(request)
    check_model(state, model_id)
    return json_response(model_card(state, model_id))
