"""A request's prompt token ids, for the exact KV index (router/kv_index.py).

The router loads no tokenizer: ids come from the body when the client sent them (`input_ids`,
or a completion `prompt` of ints), else from one worker's `POST /tokenize`, which renders a
chat with the same template and tokenizes text exactly as the generation routes do. Cost on
the request path: one loopback HTTP round trip, about 4 ms for a 260-token chat on the shared
2-core dev machine (template rendering included; tests/integration/test_kv_events.py prints it),
paid only when a policy or conditional PD consults the index and the body carries text (ids in
the body cost nothing). A /tokenize error (e.g. a prompt over the context) gives None. Batches (several
prompts), chats with tools and bodies /tokenize cannot render give None: the caller falls back
to its approximate tree (and PD to remote prefill). Looked up once per request (cached on ctx).
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.router.http.client import UpstreamError, UpstreamPool
from pdserve.router.kv_index import KVIndex
from pdserve.router.policies import Exact, Policy
from pdserve.router.request import RequestCtx
from pdserve.router.workers import Worker

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
_CHAT_KEYS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
TOKENIZE_TIMEOUT_S = 10.0  # /tokenize never reaches the engine: a worker that takes longer is in trouble


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    return None


def tokenize_body(route: str, body: dict[str, Any]) -> list[int] | bytes | None:
    """The ids themselves, or the /tokenize body that yields them, or None (not supported)."""
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or body.get("tools"):
            return None
        req = {"messages": messages, **{k: body[k] for k in _CHAT_KEYS if k in body}}
        return _enc.encode(req)
    prompt = body.get("prompt") if route == "/v1/completions" else body.get("text")
    if route == "/generate" and prompt is None:
        return _int_list(body.get("input_ids"))
    if isinstance(prompt, str):
        return _enc.encode({"prompt": prompt})
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return _enc.encode({"prompt": prompt[0]})
    return _int_list(prompt)


async def prompt_ids(ctx: RequestCtx, via: Worker, pool: UpstreamPool, timeout: float) -> list[int] | None:
    if ctx.prompt_ids is not False:
        return ctx.prompt_ids  # type: ignore[return-value]
    ids: list[int] | None = None
    spec = tokenize_body(ctx.route, ctx.json())
    if isinstance(spec, list) or spec is None:
        ids = spec
    else:
        try:
            resp = await pool.request(via.host, via.port, "POST", "/tokenize", via.fwd_headers + ctx.fwd_headers,
                                      spec, min(timeout, TOKENIZE_TIMEOUT_S))
            try:
                data = await resp.read()
            finally:
                resp.release()
            if resp.status == 200:
                obj = _dec.decode(data)
                ids = _int_list(obj.get("tokens")) if isinstance(obj, dict) else None
        except (UpstreamError, msgspec.DecodeError):
            ids = None
    ctx.prompt_ids = ids
    return ids


async def exact_hits(ctx: RequestCtx, policy: Policy, index: KVIndex | None, workers: list[Worker],
                     pool: UpstreamPool, timeout: float) -> Exact | None:
    """The exact cached prefix of each indexed worker among `workers` (None: none is indexed,
    the policy needs none, or the prompt's ids are unknown)."""
    if index is None or not policy.uses_index or len(workers) < 2:
        return None
    urls = [w.url for w in workers]
    if not index.indexed(urls):
        return None
    ids = await prompt_ids(ctx, workers[0], pool, timeout)
    if not ids:
        return None
    return index.hits(urls, ids), len(ids)
