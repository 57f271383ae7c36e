"""Bad input never gets a 5xx: a table of bad requests, each with its status and OpenAI error
body; afterwards the server still serves and the KV pool is exactly as it was before."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.conftest import greedy_generate, wait_idle

C, CH, G = "/v1/completions", "/v1/chat/completions", "/generate"
MSG = [{"role": "user", "content": "Hi"}]
LONG = list(range(100, 1100))  # 1000 prompt tokens; the test server's context is 1024


def chat(**kw: Any) -> dict[str, Any]:
    return {"messages": MSG, "max_tokens": 2, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 2, **kw}


def gen(**sp: Any) -> dict[str, Any]:
    return {"text": "Hello", "sampling_params": {"max_new_tokens": 2, **sp}}


# (case id, method, path, body: dict | bytes | None, expected status, expected param or None)
CASES: list[tuple[str, str, str, Any, int, str | None]] = [
    ("malformed-json", "POST", C, b'{"prompt": "x", ', 400, None),
    ("json-not-object", "POST", C, b'["prompt"]', 400, None),
    ("empty-body", "POST", C, b"", 400, None),
    ("nan-literal", "POST", C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("missing-prompt", "POST", C, {"max_tokens": 2}, 400, "prompt"),
    ("prompt-wrong-type", "POST", C, comp(prompt=12), 400, "prompt"),
    ("empty-prompt", "POST", C, comp(prompt=""), 400, "prompt"),
    ("empty-prompt-list", "POST", C, comp(prompt=[]), 400, "prompt"),
    ("temperature-negative", "POST", C, comp(temperature=-0.5), 400, "temperature"),
    ("temperature-string", "POST", C, comp(temperature="hot"), 400, "temperature"),
    ("top-p-zero", "POST", C, comp(top_p=0), 400, "top_p"),
    ("top-p-above-one", "POST", C, comp(top_p=1.5), 400, "top_p"),
    ("n-zero", "POST", C, comp(n=0), 400, "n"),
    ("n-above-cap", "POST", C, comp(n=1000), 400, "n"),
    ("max-tokens-above-cap", "POST", C, comp(max_tokens=100000), 400, "max_tokens"),
    ("max-tokens-zero", "POST", C, comp(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "POST", C, comp(max_tokens=-3), 400, "max_tokens"),
    ("max-tokens-float", "POST", C, comp(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-bool", "POST", C, comp(max_tokens=True), 400, "max_tokens"),
    ("prompt-plus-max-beyond-context", "POST", C, comp(prompt=LONG, max_tokens=100), 400, "max_tokens"),
    ("prompt-fills-context", "POST", C, comp(prompt=list(range(100, 1124))), 400, "prompt"),
    ("oov-token-id", "POST", C, comp(prompt=[1, 2, 10**6]), 400, "prompt"),
    ("negative-token-id", "POST", C, comp(prompt=[1, -2]), 400, "prompt"),
    ("huge-token-id", "POST", C, comp(prompt=[2**80]), 400, "prompt"),
    ("logprobs-above-cap", "POST", C, comp(logprobs=50), 400, "logprobs"),
    ("stop-empty-string", "POST", C, comp(stop=[""]), 400, "stop"),
    ("too-many-stops", "POST", C, comp(stop=[f"s{i}" for i in range(100)]), 400, "stop"),
    ("seed-huge", "POST", C, comp(seed=2**70), 400, "seed"),
    ("stream-options-wrong-type", "POST", C, comp(stream=True, stream_options="yes"), 400, "stream_options"),
    ("min-tokens-above-max", "POST", C, comp(min_tokens=5), 400, "min_tokens"),
    ("repetition-penalty-zero", "POST", C, comp(repetition_penalty=0), 400, "repetition_penalty"),
    ("too-many-prompts", "POST", C, comp(prompt=["a"] * 100), 400, "prompt"),
    ("chat-missing-messages", "POST", CH, {"max_tokens": 2}, 400, "messages"),
    ("chat-empty-messages", "POST", CH, chat(messages=[]), 400, "messages"),
    ("chat-bad-role", "POST", CH, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    ("chat-content-int", "POST", CH, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("chat-user-without-content", "POST", CH, chat(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("chat-system-null-content", "POST", CH,
     chat(messages=[{"role": "system", "content": None}, *MSG]), 400, "messages.0.content"),
    ("chat-tool-without-content", "POST", CH,
     chat(messages=[*MSG, {"role": "assistant", "content": "x"}, {"role": "tool"}]), 400, "messages.2.content"),
    ("chat-image-part", "POST", CH,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content.0"),
    ("chat-top-logprobs-without-logprobs", "POST", CH, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat-top-logprobs-above-cap", "POST", CH, chat(logprobs=True, top_logprobs=100), 400, "top_logprobs"),
    ("chat-max-completion-tokens-above-cap", "POST", CH, chat(max_completion_tokens=10**6), 400,
     "max_completion_tokens"),
    ("chat-response-format-json", "POST", CH, chat(response_format={"type": "json_schema"}), 400, "response_format"),
    ("chat-template-kwargs-reserved", "POST", CH, chat(chat_template_kwargs={"tokenize": True}), 400,
     "chat_template_kwargs"),
    ("chat-frequency-penalty", "POST", CH, chat(frequency_penalty=5), 400, "frequency_penalty"),
    ("generate-no-input", "POST", G, {"sampling_params": {"max_new_tokens": 2}}, 400, "text"),
    ("generate-text-and-ids", "POST", G, {"text": "a", "input_ids": [1]}, 400, "text"),
    ("generate-empty-ids", "POST", G, {"input_ids": []}, 400, "input_ids"),
    ("generate-oov-ids", "POST", G, {"input_ids": [49152]}, 400, "input_ids"),
    ("generate-params-not-object", "POST", G, {"text": "a", "sampling_params": [1]}, 400, "sampling_params"),
    ("generate-temperature", "POST", G, gen(temperature=-1), 400, "sampling_params.temperature"),
    ("generate-top-k", "POST", G, gen(top_k=-5), 400, "sampling_params.top_k"),
    ("generate-min-p", "POST", G, gen(min_p=2), 400, "sampling_params.min_p"),
    ("generate-stop-token-oov", "POST", G, gen(stop_token_ids=[10**7]), 400, "sampling_params.stop_token_ids"),
    ("generate-max-new-type", "POST", G, gen(max_new_tokens="many"), 400, "sampling_params.max_new_tokens"),
    ("generate-max-new-beyond-context", "POST", G,
     {"input_ids": LONG, "sampling_params": {"max_new_tokens": 200}}, 400, "sampling_params.max_new_tokens"),
    ("generate-n-above-cap", "POST", G, gen(n=99), 400, "sampling_params.n"),
    ("generate-rid-list-mismatch", "POST", G, {"text": ["a", "b"], "rid": ["x"]}, 400, "rid"),
    ("abort-without-rid", "POST", "/abort_request", {}, 400, "rid"),
    ("oversized-body", "POST", C, b'{"prompt": "' + b"a" * (3 * 2**20 // 2) + b'"}', 413, None),
    ("unknown-route", "GET", "/v1/nothing-here", None, 404, None),
    ("wrong-method", "GET", C, None, 405, None),
]


def _send(url: str, method: str, path: str, body: Any) -> httpx.Response:
    if body is None:
        return httpx.request(method, f"{url}{path}", timeout=60)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.request(method, f"{url}{path}", content=content, timeout=60,
                         headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def pool_before(base_url: str) -> dict[str, Any]:
    assert httpx.post(f"{base_url}/flush_cache", timeout=30).status_code == 200
    return wait_idle(base_url)


def test_at_least_thirty_kinds() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case,method,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(base_url: str, pool_before: dict[str, Any], case: str, method: str, path: str, body: Any,
                   status: int, param: str | None) -> None:
    r = _send(base_url, method, path, body)
    assert r.status_code == status, (case, r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, (case, err)


def test_bad_stream_request_is_4xx_before_streaming(base_url: str) -> None:
    r = _send(base_url, "POST", C, comp(stream=True, temperature=-1))
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


def test_still_serves_and_pool_unchanged(base_url: str, pool_before: dict[str, Any]) -> None:
    out = greedy_generate(base_url, [504, 3575, 282], 3)
    assert out["meta_info"]["completion_tokens"] == 3
    assert httpx.post(f"{base_url}/flush_cache", timeout=30).status_code == 200
    after = wait_idle(base_url)
    assert after["free_pages"] == pool_before["free_pages"] == after["num_pages"]
    assert after["integrity_errors"] == 0
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
