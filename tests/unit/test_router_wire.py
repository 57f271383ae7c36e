"""The router's wire pieces: HTTP parsing, PD bootstrap injection, logprob merging, request text."""

from __future__ import annotations

import json

import pytest

from pdserve.router.config import CircuitConfig, WorkerSpec
from pdserve.router.http.parser import (CHUNKED, FIXED, NO_BODY, UNTIL_CLOSE, ChunkedDecoder, ParseError,
                                        body_framing, parse_head, parse_headers, parse_request_line,
                                        parse_status_line)
from pdserve.router.pd import batch_size, inject_bootstrap
from pdserve.router.prompt_logprobs import SSEMerger, merge_body, prefill_metas
from pdserve.router.request import RouterError, pick_request_id, routing_text
from pdserve.router.workers import Worker


def test_request_line_and_headers() -> None:
    assert parse_request_line(b"POST /v1/completions?x=1 HTTP/1.1") == ("POST", "/v1/completions?x=1", "HTTP/1.1")
    for bad in (b"GET /", b"get / HTTP/1.1", b"GET / HTTP/2.0", b"GET  / HTTP/1.1", b"GET x HTTP/1.1"):
        with pytest.raises(ParseError):
            parse_request_line(bad)
    h = parse_headers([b"Content-Type: application/json", b"X-A: 1", b"x-a: 2", b"Host: h"])
    assert h == {"content-type": "application/json", "x-a": "1, 2", "host": "h"}
    for bad in ([b"no colon"], [b"bad name: 1"], [b" folded: x"], [b"Content-Length: 1", b"Content-Length: 2"]):
        with pytest.raises(ParseError):
            parse_headers(bad)


def test_framing_refuses_smuggling() -> None:
    assert body_framing({"content-length": "5"}, is_response=False) == (FIXED, 5)
    assert body_framing({"content-length": "0"}, is_response=False) == (NO_BODY, 0)
    assert body_framing({}, is_response=False) == (NO_BODY, 0)
    assert body_framing({"transfer-encoding": "chunked"}, is_response=False) == (CHUNKED, 0)
    assert body_framing({}, is_response=True) == (UNTIL_CLOSE, 0)
    assert body_framing({"content-length": "9"}, is_response=True, status=204) == (NO_BODY, 0)
    with pytest.raises(ParseError):
        body_framing({"content-length": "5", "transfer-encoding": "chunked"}, is_response=False)
    with pytest.raises(ParseError) as exc:
        body_framing({"transfer-encoding": "gzip, chunked"}, is_response=False)
    assert exc.value.status == 501
    for bad in ("-1", "1e3", " ", "0x10", "9" * 20):
        with pytest.raises(ParseError):
            body_framing({"content-length": bad}, is_response=False)


def test_parse_head_limits_and_status_line() -> None:
    buf = bytearray(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest")
    assert parse_head(buf, 1024) == b"GET / HTTP/1.1\r\nA: b" and buf == b"rest"
    assert parse_head(bytearray(b"GET / HTTP/1.1\r\n"), 1024) is None
    with pytest.raises(ParseError) as exc:
        parse_head(bytearray(b"x" * 2000), 1024)
    assert exc.value.status == 431
    assert parse_status_line(b"HTTP/1.1 503 Service Unavailable") == ("HTTP/1.1", 503)
    with pytest.raises(ParseError):
        parse_status_line(b"HTTP/1.1 OK")


def test_chunked_decoder_byte_by_byte() -> None:
    wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"
    dec, buf, out = ChunkedDecoder(), bytearray(), []
    for i in range(len(wire)):
        buf.append(wire[i])
        out += dec.feed(buf)
        if dec.done:
            break
    assert b"".join(out) == b"hello world" and dec.done
    for bad in (b"zz\r\n", b"5\r\nhelloXX", b"-1\r\n"):
        with pytest.raises(ParseError):
            ChunkedDecoder().feed(bytearray(bad))


def test_routing_text_and_request_id() -> None:
    assert routing_text("/v1/chat/completions", {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == "be brief\nhi"
    assert routing_text("/v1/completions", {"prompt": ["first", "second"]}) == "first"
    assert routing_text("/generate", {"input_ids": [1, 2, 3]}) == "1 2 3"
    assert routing_text("/generate", {"text": "abc"}) == "abc"
    assert pick_request_id({"x-request-id": "abc-1"}, ("x-request-id",)) == "abc-1"
    generated = pick_request_id({"x-request-id": "bad\nid"}, ("x-request-id",))
    assert generated != "bad\nid" and generated == generated.strip()


def prefill_worker(port: int | None = 8998) -> Worker:
    return Worker(WorkerSpec("http://10.1.2.3:30000", "prefill", port), CircuitConfig(), None, True)


def test_bootstrap_injection_single_and_batch() -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
    out = json.loads(inject_bootstrap(body, prefill_worker(), None))
    assert out["bootstrap_host"] == "10.1.2.3" and out["bootstrap_port"] == 8998
    assert 0 <= out["bootstrap_room"] < 2**63 and out["text"] == "hi"
    assert "bootstrap_room" not in body  # the caller's dict is untouched
    rooms = {json.loads(inject_bootstrap(body, prefill_worker(), None))["bootstrap_room"] for _ in range(50)}
    assert len(rooms) == 50
    batch = json.loads(inject_bootstrap({"text": ["a", "b", "c"]}, prefill_worker(None), 3))
    assert batch["bootstrap_host"] == ["10.1.2.3"] * 3 and batch["bootstrap_port"] == [None] * 3
    assert len(set(batch["bootstrap_room"])) == 3
    assert batch_size({"text": ["a", "b"]}) == 2 and batch_size({"prompt": [1, 2, 3]}) is None
    assert batch_size({"prompt": ["a"]}) == 1 and batch_size({"input_ids": [[1], [2]]}) == 2
    assert batch_size({"messages": [], "n": 3}) == 3 and batch_size({"text": "x", "n": 1}) is None
    # one room per sequence: prompts x n (n of /generate lives in its sampling_params)
    assert batch_size({"prompt": ["a", "b", "c"], "n": 2}) == 6 and batch_size({"prompt": "a", "n": 4}) == 4
    assert batch_size({"text": ["a", "b"], "sampling_params": {"n": 3}}) == 6
    with pytest.raises(RouterError):
        batch_size({"text": []})


def test_logprob_merge_json_batch_and_sse() -> None:
    pre = json.dumps({"text": "x", "meta_info": {"input_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}})
    metas = prefill_metas(pre.encode(), "application/json")
    dec = json.dumps({"text": "abc", "meta_info": {"input_token_logprobs": [], "output_token_logprobs": [[-0.1, 7, None]]}})
    merged = json.loads(merge_body(dec.encode(), metas))
    assert merged["meta_info"]["input_token_logprobs"] == [[-1.0, 5, None], [-2.0, 6, None]]
    assert merged["meta_info"]["output_token_logprobs"] == [[-0.1, 7, None]]
    batch_pre = json.dumps([{"meta_info": {"input_token_logprobs": [[-1.0, 1, None]]}},
                            {"meta_info": {"input_token_logprobs": [[-3.0, 3, None]]}}]).encode()
    batch_dec = json.dumps([{"meta_info": {}}, {"meta_info": {}}]).encode()
    out = json.loads(merge_body(batch_dec, prefill_metas(batch_pre, "application/json")))
    assert [o["meta_info"]["input_token_logprobs"][0][1] for o in out] == [1, 3]
    sse_pre = b'data: {"meta_info": {"input_token_logprobs": [[-1.5, 9, null]]}}\n\ndata: [DONE]\n\n'
    merger = SSEMerger(prefill_metas(sse_pre, "text/event-stream"))
    stream = b'data: {"text": "a", "meta_info": {"input_token_logprobs": []}}\n\ndata: {"text": "ab", "meta_info": {}}\n\ndata: [DONE]\n\n'
    out_bytes = b"".join(merger.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + merger.flush()
    events = [e for e in out_bytes.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["meta_info"]["input_token_logprobs"] == [[-1.5, 9, None]]
    assert json.loads(events[1][6:])["meta_info"]["input_token_logprobs"] == [[-1.5, 9, None]]
    assert merge_body(b"not json", metas) == b"not json"


def test_worker_dying_with_a_request_on_a_reused_connection_is_a_disconnect() -> None:
    """The keep-alive race retries once on a fresh connection; when that connect is refused the
    worker died holding our request: the error is that disconnect, not a refused connect (a PD
    router then keeps the decode leg, which recomputes)."""
    import asyncio

    from pdserve.router.http.client import UpstreamError, UpstreamPool

    async def run() -> str:
        served = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(2)  # the body "{}"
                served += 1
                if served == 2:  # the second request: die with it (close, stop listening)
                    server.close()
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(connect_timeout=2.0)
        first = await pool.request("127.0.0.1", port, "POST", "/generate", b"", b"{}", 5.0)
        assert await first.read() == b"ok"
        first.release()  # back to the pool: the next request reuses it
        try:
            await pool.request("127.0.0.1", port, "POST", "/generate", b"", b"{}", 5.0)
        except UpstreamError as exc:
            return exc.kind
        finally:
            pool.close()
        return "answered"

    assert asyncio.run(run()) == "disconnect"
