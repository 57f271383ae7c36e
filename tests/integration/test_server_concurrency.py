"""Many clients at once against a real `pdserve serve`: 32 simultaneous streams all complete
with the same greedy output as single requests, and clients that vanish mid-stream (many at
once, streaming and not) leave 0 running requests and a full KV pool."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.integration.conftest import greedy_generate, wait_idle

N_STREAMS = 32
N_DISTINCT = 8  # each prompt is streamed 4 times (later ones may hit the prefix cache)
MAX_TOKENS = 6


def _prompt(i: int) -> list[int]:
    i %= N_DISTINCT
    return [504, 3575, 282, 1000 + 37 * i, 2000 + 11 * i, 260 + i]


async def _stream_one(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, str]:
    body = {"model": "default", "prompt": _prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text, finish = "", ""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


def test_32_simultaneous_streams(base_url: str) -> None:
    singles = [greedy_generate(base_url, _prompt(i), MAX_TOKENS) for i in range(N_DISTINCT)]

    async def run() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=N_STREAMS + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_stream_one(client, base_url, i) for i in range(N_STREAMS)))

    results = asyncio.run(run())
    for i, (text, finish) in enumerate(results):
        single = singles[i % N_DISTINCT]
        assert text == single["text"], (i, text, single["text"])
        expected = "length" if single["meta_info"]["finish_reason"]["type"] == "length" else "stop"
        assert finish == expected
    wait_idle(base_url)


async def _raw_request(port: int, path: str, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    return reader, writer


async def _vanish_mid_stream(port: int, i: int, chunks: int) -> int:
    """Stream, read `chunks` data events, then drop the connection; returns events seen."""
    path, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell story {i}"}]}) \
        if i % 2 else ("/v1/completions", {"prompt": f"Story number {i}:"})
    body.update(max_tokens=300, temperature=0.8, seed=i, ignore_eos=True, stream=True)
    reader, writer = await _raw_request(port, path, body)
    seen = 0
    try:
        while seen < chunks:
            line = await asyncio.wait_for(reader.readline(), 120)
            if not line:
                break
            seen += line.startswith(b"data: ")
    finally:
        writer.close()
    return seen


async def _vanish_before_answer(port: int, i: int) -> None:
    """A non-streaming request whose client gives up after a moment."""
    body = {"prompt": f"Essay {i}:", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    _, writer = await _raw_request(port, "/v1/completions", body)
    await asyncio.sleep(1.0)
    writer.close()


def test_disconnects_free_everything(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])

    async def run() -> list[int]:
        streams = [_vanish_mid_stream(port, i, chunks=2 + i % 3) for i in range(24)]
        others = [_vanish_before_answer(port, i) for i in range(6)]
        results = await asyncio.gather(*streams, *others)
        return [r for r in results if isinstance(r, int)]

    seen = asyncio.run(run())
    assert all(s >= 2 for s in seen), seen
    load = wait_idle(base_url, timeout=90)
    assert load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0 and load["used_pages"] == 0
    assert httpx.post(f"{base_url}/flush_cache", timeout=30).status_code == 200
    load = httpx.get(f"{base_url}/get_load", timeout=10).json()
    assert load["free_pages"] == load["num_pages"] and load["integrity_errors"] == 0
    out = greedy_generate(base_url, _prompt(0), 2)  # still serving
    assert out["meta_info"]["completion_tokens"] == 2
