"""pdserve's router in front of one real unified pdserve worker (bundled model).

Greedy output through the router equals the worker's own, for completions, chat and
`/generate`, streaming and not, with the official `openai` client; a worker that dies is
ejected and the router answers 503 at once instead of hanging; the server is ready within a
minute. One model server for the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.router.config import CircuitConfig, HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import ServerProcess
from tests.mock_worker import wait_until

ARGS = ["--threads", "1", "--max-model-len", "1024", "--num-pages", "400", "--page-size", "16", "--seed", "0",
        "--max-tokens-cap", "256"]
PROMPTS = ["The capital of France is", "Write a haiku about the sea."]
N = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(ARGS, tmp_path_factory.mktemp("router-unified") / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def router(server: ServerProcess) -> Iterator[EmbeddedRouter]:
    cfg = RouterConfig(port=0, workers=(WorkerSpec(server.url),), policy=PolicyConfig("cache_aware"),
                       health=HealthConfig(interval_s=0.3, timeout_s=2.0, failure_threshold=2),
                       circuit=CircuitConfig(failure_threshold=2))
    with EmbeddedRouter(cfg) as r:
        yield r


def test_bundled_server_is_ready_within_a_minute(server: ServerProcess) -> None:
    """Issue 18: start-up (weights, prepacking, KV pool, the warm-up request) stays under 60 s."""
    assert server.startup_s is not None and server.startup_s < 60, server.startup_s


def clients(server: ServerProcess, router: EmbeddedRouter) -> tuple[openai.OpenAI, openai.OpenAI]:
    return (openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120),
            openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=120))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_completions_and_chat_equal_direct(server: ServerProcess, router: EmbeddedRouter,
                                                  stream: bool) -> None:
    direct, routed = clients(server, router)
    for prompt in PROMPTS:
        outs = []
        for c in (direct, routed):
            if stream:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="default", prompt=prompt, max_tokens=N, temperature=0, stream=True) if ch.choices)
                chat = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": prompt}], max_tokens=N, temperature=0,
                    stream=True) if ch.choices)
            else:
                text = c.completions.create(model="default", prompt=prompt, max_tokens=N, temperature=0).choices[0].text
                chat = c.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=N, temperature=0).choices[0].message.content
            outs.append((text, chat))
        assert outs[0] == outs[1] and outs[0][0]


def _generate(url: str, stream: bool) -> list[int]:
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": N, "temperature": 0}, "stream": stream}
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["output_ids"]
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return events[-1]["output_ids"]


def test_native_generate_equal_direct(server: ServerProcess, router: EmbeddedRouter) -> None:
    for stream in (False, True):
        assert _generate(router.url, stream) == _generate(server.url, stream)
    models = httpx.get(router.url + "/v1/models").json()
    assert models == httpx.get(server.url + "/v1/models").json()
    assert httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": -3}).status_code == 400


def test_dead_worker_gets_a_fast_503(server: ServerProcess, router: EmbeddedRouter) -> None:
    server.stop(timeout=10)  # last test of the module: the worker goes away
    wait_until(lambda: httpx.get(router.url + "/readiness").status_code == 503, timeout=10,
               what="the router to eject the worker")
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_workers"
