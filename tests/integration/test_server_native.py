"""SGLang-native and admin endpoints of a real `pdserve serve`: /generate (text, ids, batch,
stream, logprobs, stop), health, info, load, abort, cache flush and Prometheus metrics."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from tests.integration.conftest import greedy_generate, wait_idle


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def _sse(lines: list[str]) -> list[Any]:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_generate_text_and_meta(base_url: str) -> None:
    r = _post(base_url, "/generate", {"text": "The capital of France is", "rid": "my-rid-1",
                                      "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert meta["id"] == "my-rid-1"
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 6
    assert meta["prompt_tokens"] > 0 and meta["cached_tokens"] >= 0
    assert isinstance(out["text"], str) and out["text"]


def test_generate_stream_matches_non_stream(base_url: str) -> None:
    body = {"text": "Water boils at", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    full = _post(base_url, "/generate", body).json()
    with httpx.stream("POST", f"{base_url}/generate", json=dict(body, stream=True), timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(list(r.iter_lines()))
    last = chunks[-1]
    assert last["text"] == full["text"] and last["output_ids"] == full["output_ids"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, like SGLang


def test_generate_batch_logprobs_and_eos(base_url: str) -> None:
    r = _post(base_url, "/generate", {"input_ids": [[504, 3575, 282], [504, 3575]], "return_logprob": True,
                                      "top_logprobs_num": 2, "return_text_in_logprobs": True,
                                      "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert [o["index"] for o in outs] == [0, 1]
    for o in outs:
        lps = o["meta_info"]["output_token_logprobs"]
        assert [t[1] for t in lps] == o["output_ids"]
        assert all(t[0] <= 0 and isinstance(t[2], str) for t in lps)
        top = o["meta_info"]["output_top_logprobs"]
        assert len(top) == 3 and all(len(row) == 2 and row[0][0] >= row[1][0] for row in top)
    # stop on a stop token id: the engine reports which one matched
    first = outs[0]["output_ids"][0]
    out = greedy_generate(base_url, [504, 3575, 282], 5, stop_token_ids=[first])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert out["output_ids"] == [first]


def test_health_and_info(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{base_url}/health_generate", timeout=120).status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(f"{base_url}{path}", timeout=10).json()
        assert info["max_model_len"] == 1024 and info["engine"]["page_size"] == 16
        assert "api_key" not in info and info["host"] == "127.0.0.1"
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(f"{base_url}{path}", timeout=10).json()
        assert info["is_generation"] is True and info["model_path"]
        assert info["vocab_size"] == 49152


def test_abort_request_ends_stream(base_url: str) -> None:
    body = {"text": "Count: 1, 2, 3,", "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    seen: list[Any] = []

    def reader() -> None:
        with httpx.stream("POST", f"{base_url}/generate", json=body, timeout=120) as r:
            seen.extend(_sse(list(r.iter_lines())))

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{base_url}/get_load", timeout=10).json()["num_in_flight"] > 0:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    r = _post(base_url, "/abort_request", {"rid": "abort-me"})
    assert r.status_code == 200 and r.json()["aborted"] == ["abort-me"]
    t.join(60)
    assert not t.is_alive()
    assert seen[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert seen[-1]["meta_info"]["completion_tokens"] < 400
    assert _post(base_url, "/abort_request", {"rid": "no-such-rid"}).json()["aborted"] == []
    wait_idle(base_url)


def test_get_load_flush_cache_and_metrics(base_url: str) -> None:
    greedy_generate(base_url, list(range(100, 180)), 2)  # leaves full prompt pages in the prefix cache
    load = wait_idle(base_url)
    assert load["cached_pages"] > 0 and load["integrity_errors"] == 0
    assert httpx.post(f"{base_url}/flush_cache", timeout=30).status_code == 200
    load = httpx.get(f"{base_url}/get_load", timeout=10).json()
    assert load["free_pages"] == load["num_pages"] and load["cached_pages"] == 0
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for name in ("sglang:num_requests_total", "sglang:num_running_reqs", "sglang:num_queue_reqs",
                 "sglang:token_usage", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:time_to_first_token_seconds_bucket", "sglang:inter_token_latency_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_bucket"):
        assert name in text, name
