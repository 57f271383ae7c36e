"""Request values → engine inputs, with every check the front can make before the engine.

Used by the OpenAI and native handlers after pydantic validated the types: prompts are checked
(non-empty, in-vocabulary, leaving room in the context), `max_tokens` is resolved against the
caps and the context, and `SamplingParams` are built and validated. Every failure is an
`APIError` 400 naming the field, so bad input never reaches the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from pdserve.contract import (BOOTSTRAP_EPOCH, BOOTSTRAP_HOST, BOOTSTRAP_KEYS, BOOTSTRAP_PORT, BOOTSTRAP_ROOM, DP_RANK,
                              PRIORITY, RESUME_IDS, STREAM_IDS, TTFT_DEADLINE, per_sequence, sequence_count)
from pdserve.engine.messages import Bootstrap
from pdserve.engine.sampling_params import SamplingError, SamplingParams, check_prompt
from pdserve.server.errors import APIError, bad_request
from pdserve.server.state import ServerState

T = TypeVar("T")
INT_LIMIT = 2**31 - 1  # ints beyond this are never meaningful here (and must encode to msgpack)
SEED_LIMIT = 2**63 - 1
LONG_TEXT = 8192  # characters; longer texts are tokenized off the event loop
_TOKENIZE_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-tokenize")
DEADLINE_SHARE = 0.8  # of a TTFT deadline, the part the server aims its first token at: the rest is
# for what follows it (a PD decode's commit after the KV transfer, the router's relay)


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args)` inline when `size` is small, else in the tokenizer thread (keeps streams smooth)."""
    if size < LONG_TEXT:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, lambda: fn(*args, **kwargs))


async def encode_text(state: ServerState, text: str) -> list[int]:
    return await off_loop(len(text), state.tokenizer.encode, text)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                       code="invalid_json")
    return drop_nulls(data)


def drop_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Explicit JSON nulls mean "absent" (OpenAI allows them; SDKs and proxies send them)."""
    return {k: v for k, v in data.items() if v is not None}


def check_model(state: ServerState, model: str | None) -> None:
    """An unknown model name is a 404 (as OpenAI and vLLM answer), never silently served."""
    if model is not None and model not in state.model_names:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                       f"{', '.join(repr(n) for n in state.model_names[:3])}", param="model",
                       code="model_not_found")


def logit_bias(state: ServerState, bias: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's logit_bias (token id strings -> bias in [-100, 100]) as engine ids."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"{param} keys must be token ids, got {key!r}", param=param) from None
        if not 0 <= tid < state.vocab_size:
            raise bad_request(f"{param} token id {tid} is out of vocabulary", param=param)
        out[tid] = float(value)
    return out


def check_int(value: int | None, name: str, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"{name} must be in [{lo}, {hi}], got {value}", param=name)


def check_prompt_ids(state: ServerState, ids: list[int], param: str = "prompt") -> None:
    try:
        check_prompt(ids, state.vocab_size, state.max_model_len, param)
    except SamplingError as exc:
        raise bad_request(str(exc), param=exc.param, code=exc.code) from None


def resolve_max_tokens(state: ServerState, requested: int | None, prompt_len: int, default: int | None,
                       param: str = "max_tokens", minimum: int = 1) -> int:
    """`requested` checked against the cap and the context; None → `default` (None = the rest
    of the context), shortened to fit the context."""
    room = state.max_model_len - prompt_len
    if requested is None:
        return max(min(default if default is not None else room, room, state.max_tokens_cap), 0)
    if requested < minimum:
        raise bad_request(f"{param} must be >= {minimum}, got {requested}", param=param)
    if requested > state.max_tokens_cap:
        raise bad_request(f"{param} must be <= {state.max_tokens_cap}, got {requested}", param=param)
    if requested > room:
        raise bad_request(f"the prompt ({prompt_len} tokens) plus {param} ({requested}) exceeds the "
                          f"context of {state.max_model_len} tokens", param=param, code="context_length_exceeded")
    return requested


def stop_list(state: ServerState, stop: str | list[str] | None, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > state.config.max_stop:
        raise bad_request(f"at most {state.config.max_stop} stop strings are allowed, got {len(items)}", param=param)
    if any(not s for s in items):
        raise bad_request("stop strings must be non-empty", param=param)
    return tuple(items)


def stop_ids(state: ServerState, ids: list[int] | None, param: str = "stop_token_ids") -> tuple[int, ...]:
    if not ids:
        return ()
    if len(ids) > state.config.max_stop * 16:
        raise bad_request(f"too many stop token ids ({len(ids)})", param=param)
    for i in ids:
        if not 0 <= i < state.vocab_size:
            raise bad_request(f"stop token id {i} is out of vocabulary", param=param)
    return tuple(ids)


def check_n(state: ServerState, n: int, param: str = "n") -> None:
    if not 1 <= n <= state.config.max_n:
        raise bad_request(f"n must be in [1, {state.config.max_n}], got {n}", param=param)


def make_params(state: ServerState, prefix: str = "", **fields: Any) -> SamplingParams:
    """SamplingParams from the given fields (None means the default), validated → 400 whose
    `param` is the field name, after `prefix` (e.g. "sampling_params.")."""
    clean = {**state.sampling_defaults, **{k: v for k, v in fields.items() if v is not None}}
    for name in ("top_k", "min_new_tokens", "top_logprobs"):
        if name in clean:
            label = prefix + (name if prefix else {"min_new_tokens": "min_tokens"}.get(name, name))
            check_int(clean[name], label, -1 if name == "top_k" else 0, INT_LIMIT)
    if "seed" in clean:
        check_int(clean["seed"], prefix + "seed", -SEED_LIMIT, SEED_LIMIT)
        clean["seed"] = clean["seed"] & SEED_LIMIT  # torch seeds are non-negative
    if "logit_bias" in clean:
        clean["logit_bias"] = logit_bias(state, clean["logit_bias"], prefix + "logit_bias")
    try:
        params = SamplingParams(**clean)
        params.validate(state.config.engine.max_top_logprobs)
    except SamplingError as exc:
        param = exc.param
        if prefix and param:
            param = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}.get(param, param)
            if param == "top_logprobs":
                param = "top_logprobs_num"
            else:
                param = prefix + param
        raise bad_request(str(exc), param=param) from None
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None
    return params


def with_seed(params: SamplingParams, offset: int) -> SamplingParams:
    """Choice `offset` of n: a distinct seed so the choices differ (when a seed was given)."""
    if offset == 0 or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + offset) & SEED_LIMIT)


def resume_ids(state: ServerState, body: Any, num_subs: int, max_new: int) -> tuple[int, ...] | None:
    """The resumed ids of a migrated stream (contract.RESUME_IDS; checked: one streamed sequence,
    ids in the vocabulary, fewer than max_tokens; maybe none yet), or None for an ordinary request."""
    ids = body.pdserve_resume_ids
    if ids is None:
        return None
    param = RESUME_IDS
    if num_subs != 1 or not (body.stream or body.pdserve_stream_ids):
        raise bad_request("a resumed request carries one sequence (n = 1, one prompt) that is streamed, or whose "
                          f"progress is ({STREAM_IDS})", param=param)
    vocab = state.vocab_size
    if not all(0 <= t < vocab for t in ids):
        raise bad_request(f"{param}: token ids must be in 0..{vocab - 1}", param=param)
    if len(ids) >= max_new:
        raise bad_request(f"{param}: {len(ids)} ids leave nothing to generate under max_tokens {max_new}",
                          param=param)
    return tuple(ids)


_ROOM_STEP = 0x9E3779B97F4A7C15  # odd (golden ratio): rooms derived for the n copies of a prompt never repeat


def _per_sequence(body: Any, name: str, num_prompts: int, n: int) -> list[Any]:
    """Field `name`'s value for each sequence (contract.per_sequence: index p * n + j)."""
    try:
        return per_sequence(getattr(body, name), num_prompts, n)
    except ValueError as exc:
        raise bad_request(f"{name} {exc}", param=name) from None


def priority(state: ServerState, body: Any) -> int:
    """The request's priority (lower first); anything but 0 needs --enable-priority-scheduling (as vLLM)."""
    value = body.priority
    if value is None or value == 0:
        return 0
    if not state.config.engine.enable_priority_scheduling:
        raise bad_request(f"{PRIORITY} {value} is not supported here: start the server with "
                          "--enable-priority-scheduling", param=PRIORITY)
    check_int(value, PRIORITY, -INT_LIMIT, INT_LIMIT)
    return value


def deadline(body: Any) -> float | None:
    """The wall clock by which the first token is due (contract.TTFT_DEADLINE: ms from now), or None."""
    ms = body.ttft_deadline_ms
    if ms is None:
        return None
    if not 0 < ms < 1e9:
        raise bad_request(f"{TTFT_DEADLINE} must be in (0, 1e9) milliseconds, got {ms}", param=TTFT_DEADLINE)
    return time.time() + DEADLINE_SHARE * ms / 1000.0


def dp_rank(state: ServerState, body: Any) -> int | None:
    """The request's data-parallel rank (SGLang's field, contract.DP_RANK), checked against --dp-size."""
    rank = body.data_parallel_rank
    if rank is not None:
        check_int(rank, DP_RANK, 0, state.config.engine.parallel.dp_size - 1)
    return rank


def pd_bootstrap(state: ServerState, body: Any, num_prompts: int, n: int) -> list[Bootstrap] | None:
    """The PD bootstrap of each sequence (index prompt * n + choice), or None to serve locally.

    A unified server ignores the fields (as a decode server does for requests without them:
    prefill on decode). In a PD server they come together, each a scalar or a list (one per
    sequence, SGLang's batched form). Every sequence needs its own room: where a room is given
    once for several sequences (a scalar room, or one per prompt with n > 1), choice j > 0 of a
    prompt gets `room + j * _ROOM_STEP` (mod 2**63); prefill and decode get the same body, so
    both derive the same rooms."""
    fields = (body.bootstrap_host, body.bootstrap_port, body.bootstrap_room)
    if state.config.disagg.mode == "null" or all(f is None for f in fields):
        return None
    if any(f is None for f in fields):
        raise bad_request(f"{BOOTSTRAP_HOST}, {BOOTSTRAP_PORT} and {BOOTSTRAP_ROOM} must be given together",
                          param=BOOTSTRAP_ROOM)
    hosts, ports, given = (_per_sequence(body, name, num_prompts, n) for name in BOOTSTRAP_KEYS)
    per_seq = isinstance(body.bootstrap_room, list) and len(body.bootstrap_room) == sequence_count(num_prompts, n)
    out = []
    for k, (host, port, room) in enumerate(zip(hosts, ports, given)):
        check_int(port, BOOTSTRAP_PORT, 1, 65535)
        check_int(room, BOOTSTRAP_ROOM, 0, SEED_LIMIT)
        if not host:
            raise bad_request(f"{BOOTSTRAP_HOST} must be non-empty", param=BOOTSTRAP_HOST)
        j = 0 if per_seq else (k % n if isinstance(body.bootstrap_room, list) else k)
        out.append(Bootstrap(host=host, port=port, room=(room + j * _ROOM_STEP) & SEED_LIMIT,
                             epoch=getattr(body, BOOTSTRAP_EPOCH, None)))
    if len({b.room for b in out}) != len(out):
        raise bad_request(f"{BOOTSTRAP_ROOM}: every sequence needs its own room", param=BOOTSTRAP_ROOM)
    return out
