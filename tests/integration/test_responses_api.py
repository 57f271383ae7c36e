"""/v1/responses with the real openai-python client (`client.responses.create`, `.stream`,
`.retrieve`, `.input_items.list`, `.delete`), bundled SmolLM2:

- unified (the shared server): text with and without streaming (the streamed deltas add up to
  the answer; the stream helper rebuilds the same response), function calls with tools
  (required, named; streamed arguments equal the whole answer's), `previous_response_id`
  (the next prompt holds the previous input and output), `store: false`, the kept answers'
  routes, 400s naming the field;
- through pdserve's router: regular mode (previous_response_id expanded by the router), and PD
  (a prefill + decode pair): the same outputs as unified, streamed and not, with tools, and a
  conversation continued across requests; CORS preflight answered by server and router.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import wait_idle

N = 12
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}
PD_ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "600", "--page-size",
           "16", "--chunk-budget", "64", "--seed", "0", "--max-tokens-cap", "256"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def text_runs(c: openai.OpenAI) -> dict[str, Any]:
    """The answers the equality tests compare: plain, streamed, with tools (required, named)."""
    out: dict[str, Any] = {}
    r = c.responses.create(model="default", input="What is the capital of France?", max_output_tokens=N,
                           temperature=0)
    out["text"] = r.output_text
    events = list(c.responses.create(model="default", input="What is the capital of France?", max_output_tokens=N,
                                     temperature=0, stream=True))
    out["streamed"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete") and final.response.output_text == out["streamed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = c.responses.create(model="default", input="What is the weather in Paris?", tools=[WEATHER],
                               tool_choice=choice, max_output_tokens=40, temperature=0)
        calls = [(o.name, o.arguments) for o in r.output if o.type == "function_call"]
        streamed = list(c.responses.create(model="default", input="What is the weather in Paris?", tools=[WEATHER],
                                           tool_choice=choice, max_output_tokens=40, temperature=0, stream=True))
        done = [(e.item.name, e.item.arguments) for e in streamed
                if e.type == "response.output_item.done" and e.item.type == "function_call"]
        assert calls and done == calls, (calls, done)
        out[f"tools-{choice if isinstance(choice, str) else 'named'}"] = calls
    return out


def test_text_stream_and_the_stream_helper(base_url: str) -> None:
    c = client(base_url)
    r = c.responses.create(model="default", input="Name three colors.", instructions="Answer briefly.",
                           max_output_tokens=48, temperature=0)
    assert r.object == "response" and r.model == "default" and r.output[0].type == "message"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    with c.responses.stream(model="default", input="Name three colors.", instructions="Answer briefly.",
                            max_output_tokens=48, temperature=0) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response() if r.status == "completed" else None
    assert deltas == r.output_text
    if final is not None:  # the helper gives a final response only for a completed one (as OpenAI's)
        assert final.output_text == r.output_text and final.status == "completed"
    cut = c.responses.create(model="default", input="Count to fifty.", max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3
    wait_idle(base_url)


def test_function_calls_streamed_and_not(base_url: str) -> None:
    runs = text_runs(client(base_url))
    for key in ("tools-required", "tools-named"):
        ((name, arguments),) = runs[key][:1]
        assert name == "get_weather" and arguments.startswith("{")
    wait_idle(base_url)


def test_previous_response_id_continues_the_conversation(base_url: str) -> None:
    c = client(base_url)
    first = c.responses.create(model="default", input="My name is Ada. What is 2+2?", max_output_tokens=N,
                               temperature=0)
    second = c.responses.create(model="default", input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=N, temperature=0)
    assert second.previous_response_id == first.id
    # the second prompt holds the first input, the first answer and the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = c.responses.input_items.list(second.id, order="asc", limit=100).data
    assert [i.type for i in items] == ["message", "message", "message"]
    assert items[1].role == "assistant" and items[1].content[0].text == first.output_text
    assert c.responses.retrieve(first.id).output_text == first.output_text
    # tool results continue a conversation too
    call = c.responses.create(model="default", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                              max_output_tokens=40, temperature=0)
    fc = next(o for o in call.output if o.type == "function_call")
    after = c.responses.create(model="default", previous_response_id=call.id, tools=[WEATHER], tool_choice="none",
                               input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "18 C"}],
                               max_output_tokens=N, temperature=0)
    assert after.status in ("completed", "incomplete") and after.output[0].type == "message"
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="default", input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    unstored = c.responses.create(model="default", input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    wait_idle(base_url)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input.0.content.0"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}, "tools": [WEATHER]}, "tool_choice"),
])
def test_what_is_not_implemented_is_a_400_naming_it(base_url: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{base_url}/v1/responses", json={"model": "default", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_cors_preflight_and_headers(base_url: str) -> None:
    asked = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, authorization"}
    r = httpx.options(f"{base_url}/v1/responses", headers=asked)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(f"{base_url}/v1/models", headers={"Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.fixture(scope="module")
def regular_router(base_url: str) -> Iterator[EmbeddedRouter]:
    cfg = RouterConfig(port=0, workers=(WorkerSpec(base_url),), policy=PolicyConfig("round_robin"),
                       health=HealthConfig(interval_s=1.0, timeout_s=20.0))
    with EmbeddedRouter(cfg) as r:
        yield r


def test_regular_router_expands_previous_response_id(regular_router: EmbeddedRouter, base_url: str) -> None:
    c = client(regular_router.url)
    first = c.responses.create(model="default", input="My name is Ada.", max_output_tokens=N, temperature=0)
    second = c.responses.create(model="default", input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=N, temperature=0)
    direct = client(base_url).responses.create(model="default", input="What is my name?",
                                               previous_response_id=first.id, max_output_tokens=N, temperature=0)
    assert second.previous_response_id == first.id and second.output_text == direct.output_text
    assert second.usage.input_tokens == direct.usage.input_tokens
    assert c.responses.retrieve(second.id).id == second.id  # GET passes through to the worker keeping it
    assert httpx.get(f"{regular_router.url}/v1/responses/resp_none").status_code == 404
    r = httpx.options(f"{regular_router.url}/v1/responses", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert httpx.post(f"{regular_router.url}/v1/responses", json={"model": "default", "input": "x",
                                                                   "max_output_tokens": 1},
                      headers={"Origin": "http://ui.example"}, timeout=60).headers["access-control-allow-origin"] == "*"
    wait_idle(base_url)


@pytest.fixture(scope="module")
def pd_router(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[EmbeddedRouter]:
    from tests.integration.pd_cluster import running_pair

    with running_pair(tmp_path_factory.mktemp("responses-pd"), "tcp", PD_ARGS) as pair:
        prefill, decode = pair.urls
        cfg = RouterConfig(port=0, pd=True, workers=(WorkerSpec(prefill, "prefill", pair.bootstrap_port),
                                                     WorkerSpec(decode, "decode")),
                           policy=PolicyConfig("round_robin"), health=HealthConfig(interval_s=1.0, timeout_s=20.0))
        with EmbeddedRouter(cfg) as r:
            r.pair = pair  # type: ignore[attr-defined]
            yield r


def test_pd_equals_unified_streamed_and_not_with_tools(pd_router: EmbeddedRouter, base_url: str) -> None:
    # PD equals the decode server answering the same requests itself (no bootstrap fields: it prefills)
    decode_url = pd_router.pair.decode.url  # type: ignore[attr-defined]
    assert text_runs(client(pd_router.url)) == text_runs(client(decode_url))
    c = client(pd_router.url)
    first = c.responses.create(model="default", input="My name is Ada.", max_output_tokens=N, temperature=0)
    second = c.responses.create(model="default", input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=N, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    pd_router.pair.settled()  # type: ignore[attr-defined]
