"""Request fields pdserve knows but does not implement: a 400 naming the field, never silence.

Each handler calls `reject_unsupported(data, TABLE)` on the decoded JSON body before it
validates it. A table maps a field to the value that leaves behaviour unchanged (vLLM's or
OpenAI's default): the field may be absent, null, or that value; anything else is refused
with `param` set to the field. Fields that no table names are ignored (as OpenAI ignores
unknown fields); fields that are implemented are not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.server.errors import bad_request

ANY = object()  # no value is harmless: present (and not null) means refused

# OpenAI + vLLM extras shared by /v1/completions and /v1/chat/completions
_OPENAI: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "prompt_logprobs": ANY,
    "truncate_prompt_tokens": ANY,
    "allowed_token_ids": ANY,
    "bad_words": ANY,
    "logits_processors": ANY,
    "return_tokens_as_token_ids": False,
    "spaces_between_special_tokens": True,
    "mm_processor_kwargs": ANY,
    "kv_transfer_params": ANY,
    "vllm_xargs": ANY,
    "stop_regex": ANY,
}

COMPLETIONS: dict[str, Any] = {**_OPENAI, "prompt_embeds": ANY, "suffix": "", "best_of": 1}

CHAT: dict[str, Any] = {
    **_OPENAI,
    "audio": ANY,
    "modalities": ["text"],
    "prediction": ANY,
    "web_search_options": ANY,
    "reasoning_effort": ANY,
    "echo": False,
    "documents": ANY,
    "chat_template": ANY,
    "service_tier": ANY,
    "functions": ANY,  # the legacy form of tools (which pdserve implements)
    "function_call": ANY,
}
_SERVICE_TIERS = ("auto", "default")

# /v1/responses: OpenAI's fields pdserve does not implement (built-in tools, non-text parts and
# hosted tool choices are refused where they are read, server/responses.py)
RESPONSES: dict[str, Any] = {
    **_OPENAI,
    "background": False,
    "conversation": ANY,
    "prompt": ANY,
    "include": [],
    "reasoning": ANY,
    "max_tool_calls": ANY,
    "top_logprobs": 0,
    "truncation": "disabled",
    "context_management": ANY,
    "service_tier": ANY,
    "logprobs": False,
    "n": 1,
}

GENERATE: dict[str, Any] = {
    "lora_path": ANY,
    "image_data": ANY,
    "video_data": ANY,
    "audio_data": ANY,
    "input_embeds": ANY,
    "return_hidden_states": False,
    "session_params": ANY,
    "custom_logit_processor": ANY,
    "token_ids_logprob": ANY,
}

GENERATE_SAMPLING: dict[str, Any] = {
    "spaces_between_special_tokens": True,
    "stop_regex": ANY,
    "custom_params": ANY,
}


def reject_unsupported(data: Mapping[str, Any], table: Mapping[str, Any], prefix: str = "") -> None:
    for name, harmless in table.items():
        if name not in data or data[name] is None:
            continue
        value = data[name]
        if name == "service_tier" and value in _SERVICE_TIERS:
            continue
        if name == "best_of" and value == (data.get("n") or 1):  # best_of = n: exactly what n does
            continue
        if harmless is not ANY and value == harmless and type(value) is type(harmless):
            continue
        if harmless is not ANY and isinstance(harmless, float) and isinstance(value, int) \
                and not isinstance(value, bool) and value == harmless:
            continue
        shown = f"{prefix}{name}"
        raise bad_request(f"{shown} is not supported by pdserve" + (
            "" if harmless is ANY else f" (only its default, {harmless!r}, is accepted)"), param=shown)
