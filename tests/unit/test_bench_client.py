"""pdserve.bench.client against a scripted aiohttp SSE server (no model)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from pdserve.bench.client import BenchClient, ClientOptions
from pdserve.bench.datasets import BenchRequest


def _frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _serve(handler: Any, coro: Any) -> Any:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await coro(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def _streamer(frames: list[bytes | float], status: int = 200, seen: list[dict] | None = None) -> Any:
    """A handler that writes `frames` (a float = sleep that many seconds)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append({"body": await request.json(), "auth": request.headers.get("Authorization")})
        if status != 200:
            return web.json_response({"error": {"message": "bad prompt"}}, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for f in frames:
            if isinstance(f, float):
                await asyncio.sleep(f)
            else:
                await resp.write(f)
        await resp.write_eof()
        return resp
    return handler


def _send(frames: list[bytes | float], status: int = 200, endpoint: str = "/v1/completions",
          prompt: Any = (1, 2, 3), timeout_s: float = 10.0, seen: list[dict] | None = None) -> Any:
    async def go(url: str) -> Any:
        opts = ClientOptions(base_url=url, model="m", endpoint=endpoint, api_key="k", timeout_s=timeout_s)
        async with BenchClient(opts) as client:
            return await client.send(BenchRequest(list(prompt) if isinstance(prompt, tuple) else prompt, 3, 4))
    return asyncio.run(_serve(_streamer(frames, status, seen), go))


def _text(t: str, finish: str | None = None) -> bytes:
    return _frame({"choices": [{"index": 0, "text": t, "finish_reason": finish}], "usage": None})


def test_stream_timing_and_usage() -> None:
    seen: list[dict] = []
    frames: list[bytes | float] = [0.05, _text("a"), 0.05, _text(""), _text("b"), 0.05, _text("c", "length"),
                                   _frame({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
                                   b"data: [DONE]\n\n"]
    rec = _send(frames, seen=seen)
    assert rec.success, rec.error
    assert rec.output_tokens == 4  # from usage, though only 3 chunks carried text
    assert len(rec.chunk_times) == 3 and len(rec.itl) == 2
    assert rec.ttft >= 0.04 and all(g >= 0.04 for g in rec.itl)
    assert rec.latency >= rec.ttft + sum(rec.itl) - 1e-6
    body = seen[0]["body"]
    assert seen[0]["auth"] == "Bearer k"
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 4 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["model"] == "m"


def test_chunk_count_without_usage_and_chat() -> None:
    chat = [_frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            _frame({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}),
            _frame({"choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": None}]}),
            _frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}), b"data: [DONE]\n\n"]
    seen: list[dict] = []
    rec = _send(chat, endpoint="/v1/chat/completions", prompt="hello", seen=seen)
    assert rec.success and rec.output_tokens == 2 and len(rec.itl) == 1
    assert seen[0]["body"]["messages"] == [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("frames,status,timeout_s,expect", [
    ([_text("a"), _frame({"error": {"message": "engine died"}}), b"data: [DONE]\n\n"], 200, 10.0, "engine died"),
    ([], 400, 10.0, "HTTP 400"),
    ([_text("a")], 200, 10.0, "without [DONE]"),
    ([_text("a"), 2.0, b"data: [DONE]\n\n"], 200, 0.5, "timeout"),
])
def test_errors_are_recorded(frames: list, status: int, timeout_s: float, expect: str) -> None:
    rec = _send(frames, status=status, timeout_s=timeout_s)
    assert not rec.success and expect in rec.error
    assert rec.latency > 0


def test_chat_needs_text() -> None:
    rec = _send([], endpoint="/v1/chat/completions", prompt=(1, 2))
    assert not rec.success and "text prompts" in rec.error
