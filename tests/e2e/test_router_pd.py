"""Real PD through routers: one prefill + one decode pdserve server (bundled model, tcp transfer).

- pdserve's router (PD mode) in front: greedy output equals the unified path (the decode
  server answering the same request itself, without bootstrap fields) for completions, chat
  and `/generate`, streaming and not, with the official `openai` client;
- SGLang's own router (`sglang_router.launch_router --pd-disaggregation`) in front of the same
  pdserve workers gives the same output;
- a prefill killed mid-request costs the client nothing: the router keeps the decode leg,
  whose transfer fails at once (session lost) and which recomputes the prompt itself
  (`--disaggregation-failure-policy recompute`, the default); its reserved pages return and
  the answer equals the unified one (last test: it kills the prefill).
Skipped when `pdserve serve` has no `--disaggregation-mode` yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import ROOT, free_port
from tests.mock_worker import wait_until


def _pd_supported() -> bool:
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return "--disaggregation-mode" in out.stdout


pytestmark = pytest.mark.skipif(not _pd_supported(), reason="pdserve serve has no --disaggregation-mode yet")

ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "600", "--page-size", "16",
        "--chunk-budget", "64", "--seed", "0", "--max-tokens-cap", "256"]
PROMPTS = ["The capital of France is", "Write a haiku about the sea."]
N = 10


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator:
    from tests.integration.pd_cluster import running_pair

    with running_pair(tmp_path_factory.mktemp("router-pd"), "tcp", ARGS) as p:
        yield p


@pytest.fixture(scope="module")
def router(pair) -> Iterator[EmbeddedRouter]:
    prefill, decode = pair.urls
    cfg = RouterConfig(port=0, pd=True, workers=(WorkerSpec(prefill, "prefill", pair.bootstrap_port),
                                                 WorkerSpec(decode, "decode")),
                       policy=PolicyConfig("round_robin"), retry=RetryConfig(max_attempts=2, initial_backoff_s=0.05),
                       health=HealthConfig(interval_s=0.5, timeout_s=2.0))
    with EmbeddedRouter(cfg) as r:
        yield r


def outputs(base: str) -> list:
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    out: list = []
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        out.append(c.completions.create(model="default", prompt=prompt, max_tokens=N, temperature=0).choices[0].text)
        out.append(c.chat.completions.create(model="default", messages=msgs, max_tokens=N,
                                             temperature=0).choices[0].message.content)
        out.append("".join(ch.choices[0].text for ch in c.completions.create(
            model="default", prompt=prompt, max_tokens=N, temperature=0, stream=True) if ch.choices))
        out.append("".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="default", messages=msgs, max_tokens=N, temperature=0, stream=True) if ch.choices))
    for stream in (False, True):
        body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": N, "temperature": 0}, "stream": stream}
        r = httpx.post(base + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        out.append((events[-1] if stream else r.json())["output_ids"])
    return out


@pytest.fixture(scope="module")
def unified(pair) -> list:
    """The unified path's answers: the decode server serving the requests itself."""
    return outputs(pair.urls[1])


def test_pdserve_router_equals_unified(pair, router: EmbeddedRouter, unified: list) -> None:
    assert outputs(router.url) == unified
    assert all(unified)
    ttft = httpx.get(router.url + "/metrics").text
    assert "pdserve_router_pd_ttft_seconds_count" in ttft


def test_sglang_router_in_front_of_pdserve_workers(pair, unified: list) -> None:
    pytest.importorskip("sglang_router")
    prefill, decode = pair.urls
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--prefill", prefill,
           str(pair.bootstrap_port), "--decode", decode, "--policy", "round_robin", "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
           "--worker-startup-check-interval", "1", "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.post(url + "/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 1},
                                  timeout=30).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: proc.poll() is not None or up(), timeout=90, what="sglang-router")
        assert proc.poll() is None
        assert outputs(url) == unified
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_dead_prefill_mid_request_is_recomputed_by_the_decode(pair, router: EmbeddedRouter) -> None:
    from tests.integration.pd_cluster import get_load, pool_mark, wait_settled

    prefill, decode = pair.urls
    mark = pool_mark(decode)
    long_prompt = "Tell me everything about the history of Rome. " * 80  # ~800 tokens, 64 per forward
    body = {"prompt": long_prompt, "max_tokens": 16, "temperature": 0}
    unified = httpx.post(decode + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    wait_settled(decode, mark, timeout=30)
    result: dict = {}

    def call() -> None:
        t0 = time.monotonic()
        result["r"] = httpx.post(router.url + "/v1/completions", json=body, timeout=120)
        result["s"] = time.monotonic() - t0

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: get_load(decode)["num_in_flight"] > 0 and get_load(prefill)["num_in_flight"] > 0, timeout=30,
               what="both legs to reach the servers")
    killed_at = time.monotonic()
    pair.kill_prefill()  # kill -9 while it is still prefilling
    t.join(60)
    assert not t.is_alive()
    resp = result["r"]
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == unified  # recomputed: nothing lost
    assert time.monotonic() - killed_at < 30
    wait_settled(decode, mark, timeout=30)  # the failed transfer's reserved pages came back
    wait_until(lambda: httpx.get(router.url + "/readiness").status_code == 503, timeout=10, what="PD readiness")
