"""Request bodies of the HTTP API as pydantic models (strict types, unknown fields ignored).

Handlers decode the raw JSON themselves (so malformed JSON gets a clean 400) and validate it
with these models; a ValidationError becomes a 400 whose `param` names the field. Strict mode
refuses `true` for an int, `"0.5"` for a float and the like; ints are accepted for floats.
Value ranges (temperature >= 0, top_p in (0, 1], caps...) are checked in `params.py`.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from pdserve.contract import BODY_FIELDS

_CONFIG = ConfigDict(extra="ignore", strict=True)

Prompt = Union[str, list[str], list[int], list[list[int]]]
Stop = Union[str, list[str], None]


class _Model(BaseModel):
    model_config = _CONFIG


class StreamOptions(_Model):
    include_usage: bool = False


# The fields a router adds, exactly as the contract names and types them (pdserve/contract):
# where the prefill's bootstrap server is and the room (a scalar or a list with one entry per
# sequence, SGLang's batched form for n > 1 and prompt lists; `params.pd_bootstrap` pairs them
# with the sequences), the data-parallel rank, and pdserve's router's stream migration fields
# (the ids of each streamed event asked for; a stream another server started continued: those
# ids were already delivered, count as output and are not sent again; its chunks' id and time).
_BootstrapFields = create_model("_BootstrapFields", __base__=_Model,
                                **{name: (kind, default) for name, kind, default in BODY_FIELDS})  # type: ignore


class JSONSchemaFormat(_Model):
    name: str | None = None
    description: str | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: str = "text"
    json_schema: JSONSchemaFormat | None = None


class _SamplingFields(_BootstrapFields):
    """Sampling knobs shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM/SGLang extras)."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    top_k: int | None = None
    min_p: float | None = Field(default=None, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    no_stop_trim: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # structured output (server/structured.py): OpenAI's and vLLM's names
    response_format: ResponseFormat | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False


class FunctionCall(_Model):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Model):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: str = "function"
    function: FunctionDef


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: str = "function"
    function: ToolChoiceFunction


class TextPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[str, NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class NativeSamplingParams(_Model):
    """SGLang's `sampling_params` names for /generate."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    # None: the model's default (generation_config.json), else SamplingParams'
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    top_k: int | None = None
    min_p: float | None = Field(default=None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = Field(default=None, validation_alias=AliasChoices("seed", "sampling_seed"))
    n: int = 1
    logit_bias: dict[str, float] | None = None
    json_schema: Union[str, dict[str, Any], None] = None  # structured output (server/structured.py)
    regex: str | None = None
    ebnf: str | None = None


class GenerateRequest(_BootstrapFields):
    """SGLang's /generate body (single or batched prompt)."""

    text: Union[str, list[str], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # >= 0: input_token_logprobs from this prompt position (-1: none)
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: Union[str, list[str], None] = None


class AbortRequest(_Model):
    rid: str = ""
    abort_all: bool = False



class ResponsesRequest(_SamplingFields):
    """OpenAI's Responses API body (/v1/responses); the extra sampling knobs of chat are accepted
    too, as vLLM does. Items and tools stay dicts here: server/responses.py reads them."""

    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
