"""The OpenAI API of a real `pdserve serve`, driven by the official `openai` client.

Greedy output through the server (completions and chat, streaming and not, /generate with
input ids) equals the offline engine's on the same config; usage, n, stop strings, seeds,
logprobs and max_completion_tokens behave as OpenAI clients expect.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from pdserve import SamplingParams
from tests.integration.conftest import greedy_generate, wait_idle

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(offline_llm: Any) -> dict[str, Any]:
    """Greedy offline outputs, one request at a time (as the server runs them in these tests)."""
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0)
    out = {}
    for p in PROMPTS:
        (res,) = offline_llm.generate([p], params, use_tqdm=False)
        out[p] = res
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_offline(client: openai.OpenAI, offline: dict[str, Any], prompt: str) -> None:
    resp = client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    ref = offline[prompt]
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_ids)
    assert resp.usage.completion_tokens == len(ref.output_ids)
    assert resp.usage.total_tokens == len(ref.prompt_ids) + len(ref.output_ids)


def test_completion_stream_equals_offline(client: openai.OpenAI, offline: dict[str, Any]) -> None:
    prompt = PROMPTS[1]
    stream = client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts.append(c.text)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    ref = offline[prompt]
    assert "".join(texts) == ref.text
    assert finishes == [ref.finish_reason]
    assert usage is not None and usage.completion_tokens == len(ref.output_ids)
    assert usage.prompt_tokens == len(ref.prompt_ids)


def test_generate_input_ids_equals_offline(base_url: str, offline: dict[str, Any]) -> None:
    ref = offline[PROMPTS[2]]
    out = greedy_generate(base_url, ref.prompt_ids, MAX_TOKENS)
    assert out["output_ids"] == ref.output_ids
    assert out["text"] == ref.text
    assert out["meta_info"]["prompt_tokens"] == len(ref.prompt_ids)
    assert out["meta_info"]["completion_tokens"] == len(ref.output_ids)


def test_chat_greedy_equals_offline(client: openai.OpenAI, offline_llm: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = offline_llm.tokenizer.apply_chat_template(messages)
    (ref,) = offline_llm.generate([ids], SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    resp = client.chat.completions.create(model="default", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model="default", messages=messages, max_completion_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    roles, parts, finishes, usage = [], [], [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert roles == ["assistant"]
    assert "".join(parts) == ref.text
    assert finishes == [ref.finish_reason]
    assert usage is not None and usage.completion_tokens == len(ref.output_ids)


def test_chat_runs_to_eos(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="default", temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": "What is 2+2? Answer with a number only."}])  # ~8 tokens, then EOS
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content.strip()
    assert "<|im_end|>" not in resp.choices[0].message.content


def test_n_and_seed(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="default", prompt="My favourite colour is", max_tokens=8, temperature=1.0)
    a = client.completions.create(n=3, seed=1234, **kw)
    b = client.completions.create(n=3, seed=1234, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert 3 <= a.usage.completion_tokens <= 24
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_batched_prompts(client: openai.OpenAI, offline: dict[str, Any]) -> None:
    resp = client.completions.create(model="default", prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in resp.choices}
    assert by_index[0] == by_index[1] == offline[PROMPTS[0]].text
    assert by_index[2] == by_index[3] == offline[PROMPTS[1]].text


def test_stop_string(client: openai.OpenAI, offline: dict[str, Any]) -> None:
    ref = offline[PROMPTS[0]].text  # " Paris. ..." style text
    stop = ref.strip()[2:5]
    assert stop and stop in ref
    for stream in (False, True):
        kw: dict[str, Any] = dict(model="default", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.text for ch in chunks for c in ch.choices)
            finish = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
        else:
            resp = client.completions.create(**kw)
            text, finish = resp.choices[0].text, [resp.choices[0].finish_reason]
        assert text == ref[:ref.index(stop)]
        assert finish == ["stop"]


def test_logprobs(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == resp.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(val, abs=1e-4)
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_models_and_unknown_fields(client: openai.OpenAI, base_url: str) -> None:
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].id == "default"
    resp = client.completions.create(model="default", prompt="Hello", max_tokens=2, temperature=0,
                                     extra_body={"bootstrap_host": "x", "bootstrap_room": 123, "no_such_field": [1]})
    assert resp.choices[0].finish_reason == "length"
    wait_idle(base_url)
