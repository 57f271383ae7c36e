"""Nothing silent on a real `pdserve serve`: logit_bias changes the output, known-but-unimplemented
fields get a 400 naming them, explicit nulls mean absent, an unknown model is a 404, and the
/tokenize, /detokenize, /version and /v1/models/{id} endpoints answer (shared server)."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=120)


def test_logit_bias_forces_and_bans(client: openai.OpenAI, base_url: str) -> None:
    kw = dict(model="default", prompt="The capital of France is", max_tokens=4, temperature=0)
    plain = post(base_url, "/generate", {"text": kw["prompt"], "sampling_params": {"max_new_tokens": 4,
                                                                                  "temperature": 0}}).json()
    first = plain["output_ids"][0]
    banned = post(base_url, "/generate", {"text": kw["prompt"], "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "logit_bias": {str(first): -100}}}).json()
    assert banned["output_ids"][0] != first
    forced = post(base_url, "/generate", {"text": kw["prompt"], "sampling_params": {
        "max_new_tokens": 4, "temperature": 0.7, "logit_bias": {"28": 100}}}).json()
    assert forced["output_ids"] == [28] * 4
    text = post(base_url, "/detokenize", {"tokens": [28] * 4}).json()["prompt"]
    assert client.completions.create(logit_bias={"28": 100}, **kw).choices[0].text == text
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logit_bias={"28": 100})
    assert chat.choices[0].message.content == text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "a", "length_penalty": 0.5}, "length_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "reasoning_effort": "low"},
     "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "bad_words": ["x"]}, "bad_words"),
    ("/generate", {"text": "a", "lora_path": "x"}, "lora_path"),
    ("/generate", {"text": "a", "sampling_params": {"stop_regex": "x"}}, "sampling_params.stop_regex"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 200}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "suffix": " end"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "functions": [{"name": "f", "parameters": {}}]}, "functions"),
])
def test_unimplemented_fields_are_400_naming_them(base_url: str, path: str, body: dict, param: str) -> None:
    r = post(base_url, path, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_harmless_defaults_and_explicit_nulls_are_accepted(base_url: str) -> None:
    body = {"model": "default", "prompt": "a", "max_tokens": 2, "n": None, "stream": None, "logprobs": None,
            "echo": None, "seed": None, "stop": None, "use_beam_search": False, "spaces_between_special_tokens": True,
            "temperature": 0, "suffix": None, "best_of": 1}
    r = post(base_url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    chat = {"model": "default", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "n": None,
            "stream": None, "logprobs": None, "top_logprobs": None, "service_tier": "auto", "temperature": 0}
    assert post(base_url, "/v1/chat/completions", chat).status_code == 200
    gen = {"text": "a", "sampling_params": {"max_new_tokens": 2, "temperature": None, "n": None}, "stream": None}
    assert post(base_url, "/generate", gen).status_code == 200


def test_unknown_model_is_404(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4o", prompt="a", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_tokenize_detokenize_version(base_url: str) -> None:
    r = post(base_url, "/tokenize", {"prompt": "Hello world"})
    assert r.status_code == 200, r.text
    toks = r.json()["tokens"]
    assert r.json()["count"] == len(toks) > 0 and r.json()["max_model_len"] == 1024
    back = post(base_url, "/detokenize", {"tokens": toks}).json()
    assert back["prompt"].endswith("Hello world") and back["text"] == back["prompt"]
    chat = post(base_url, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    rendered = post(base_url, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert "Hi" in rendered and rendered.rstrip().endswith("assistant")
    batch = post(base_url, "/tokenize", {"prompt": ["a", "b c"], "add_special_tokens": False}).json()
    assert len(batch["tokens"]) == 2
    assert post(base_url, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert post(base_url, "/tokenize", {"prompt": "a", "model": "gpt-4o"}).status_code == 404
    assert httpx.get(base_url + "/version", timeout=10).json()["version"]
