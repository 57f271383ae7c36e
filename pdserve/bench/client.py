"""Streaming OpenAI client for the benchmark: one aiohttp session, one SSE stream per request.

Each request POSTs ``{base_url}{endpoint}`` (``/v1/completions``, or ``/v1/chat/completions``
with the prompt as the one user message) with ``stream: true`` and
``stream_options.include_usage``, then reads the SSE body:

- TTFT = send → first chunk carrying text; every later text chunk adds an ITL gap;
- ``output_tokens`` = the final ``usage.completion_tokens`` (else the number of text chunks);
- the request succeeds once ``[DONE]`` or a ``finish_reason`` arrives with status 200;
  HTTP errors, error frames, timeouts and connection errors are recorded, never raised.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestRecord

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class ClientOptions:
    """Where and how the client sends requests."""

    base_url: str
    model: str
    endpoint: str = COMPLETIONS
    api_key: str | None = None
    timeout_s: float = 600.0
    temperature: float = 0.0
    ignore_eos: bool = True

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(opts: ClientOptions, req: BenchRequest) -> dict[str, Any]:
    """The JSON body for ``req`` (chat endpoints need a text prompt)."""
    body: dict[str, Any] = {
        "model": opts.model,
        "max_tokens": req.output_len,
        "temperature": opts.temperature,
        "ignore_eos": opts.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.is_chat:
        if not isinstance(req.prompt, str):
            raise ValueError(f"{opts.endpoint} needs text prompts, got token ids (use as_text / --random-as-text)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(data: dict[str, Any], chat: bool) -> tuple[str, bool]:
    """(text of the chunk's first choice, whether it carries a finish_reason)."""
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return "", False
    choice = choices[0]
    finished = choice.get("finish_reason") is not None
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
    else:
        text = choice.get("text") or ""
    return text, finished


def _error_message(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    err = data.get("error") or data.get("message")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or data)


class BenchClient:
    """An aiohttp session that sends benchmark requests; use as ``async with BenchClient(opts)``."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BenchClient:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, headers=auth_headers(self.opts.api_key),
                                              timeout=aiohttp.ClientTimeout(total=self.opts.timeout_s))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("BenchClient is not open (use `async with`)")
        return self._session

    async def send(self, req: BenchRequest, origin: float | None = None) -> RequestRecord:
        """Send ``req`` and time its stream; ``origin`` (a perf_counter value) is the record's t=0."""
        origin = time.perf_counter() if origin is None else origin
        rec = RequestRecord(prompt_len=req.prompt_len, group=req.group)
        try:
            payload = build_payload(self.opts, req)
        except ValueError as exc:
            rec.error = str(exc)
            return rec
        st = time.perf_counter()
        rec.start = st - origin
        try:
            await self._stream(payload, st, origin, rec)
        except asyncio.TimeoutError:
            rec.success, rec.error = False, f"timeout after {self.opts.timeout_s:g} s"
        except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
            rec.success, rec.error = False, f"{type(exc).__name__}: {exc}"
        if not rec.success:
            rec.latency = time.perf_counter() - st
        return rec

    async def _stream(self, payload: dict[str, Any], st: float, origin: float, rec: RequestRecord) -> None:
        chat = self.opts.is_chat
        usage_tokens: int | None = None
        done = False
        last = st
        async with self.session.post(self.opts.url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                rec.error = f"HTTP {resp.status}: {body}"
                return
            buf = b""
            async for piece in resp.content.iter_any():
                now = time.perf_counter()
                buf += piece
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data_text = line[5:].strip()
                    if data_text == b"[DONE]":
                        done = True
                        continue
                    data = json.loads(data_text)
                    if isinstance(data, dict) and (data.get("error") is not None or data.get("object") == "error"):
                        rec.error = _error_message(data)
                        return
                    if not isinstance(data, dict):
                        continue
                    usage = data.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    text, finished = _chunk_text(data, chat)
                    done = done or finished
                    if text:
                        if not rec.chunk_times:
                            rec.ttft = now - st
                        else:
                            rec.itl.append(now - last)
                        last = now
                        rec.chunk_times.append(now - origin)
        rec.latency = time.perf_counter() - st
        if not done:
            rec.error = "the stream ended without [DONE] or a finish_reason"
            return
        if not rec.chunk_times:
            rec.ttft = rec.latency  # no text at all: the first token is only known at the end
        rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.chunk_times)
        rec.success = True


async def list_models(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The ``data`` list of ``GET {base_url}/v1/models``."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, headers=auth_headers(api_key)) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {base_url}/v1/models: HTTP {resp.status}: {(await resp.text())[:300]}")
            body = await resp.json(content_type=None)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data:
        raise RuntimeError(f"GET {base_url}/v1/models returned no models: {body!r}"[:400])
    return data
