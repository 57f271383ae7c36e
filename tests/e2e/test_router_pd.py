"""Real PD through routers: one prefill + one decode pdserve server (bundled model, tcp transfer).

- pdserve's router (PD mode) in front: greedy output equals the unified path (the decode
  server answering the same request itself, without bootstrap fields) for completions, chat
  and `/generate`, streaming and not, with the official `openai` client;
- n > 1 and prompt lists (one bootstrap room per sequence), seeded sampling: the same choices
  through either router as the unified path;
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


def sampled_outputs(base: str, generate_batch: bool = True) -> list:
    """n > 1 and prompt lists, seeded sampling: one room per sequence through PD. (sglang-router
    0.3.2 itself refuses a /generate whose text is a list: 422 from its own schema.)"""
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    kw = dict(model="default", max_tokens=6, temperature=0.8, seed=7)
    out: list = [[ch.text for ch in c.completions.create(prompt=PROMPTS[0], n=4, **kw).choices]]
    out.append([ch.text for ch in c.completions.create(prompt=[PROMPTS[0], PROMPTS[1], "Once upon a time"],
                                                       **kw).choices])
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    out.append([ch.message.content for ch in c.chat.completions.create(messages=msgs, n=4, **kw).choices])
    if not generate_batch:
        return out
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 6, "temperature": 0.8, "seed": 3, "n": 2}}
    r = httpx.post(base + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out.append([x["output_ids"] for x in r.json()])
    return out


@pytest.fixture(scope="module")
def unified_sampled(pair) -> list:
    return sampled_outputs(pair.urls[1])


def test_n_and_prompt_lists_through_pd_equal_unified(pair, router: EmbeddedRouter, unified_sampled: list) -> None:
    assert [len(x) for x in unified_sampled] == [4, 3, 4, 4]
    assert len(set(unified_sampled[0])) > 1  # seeded copies differ: the comparison is of sampled streams
    assert sampled_outputs(router.url) == unified_sampled
    failures = [x for x in httpx.get(router.url + "/metrics").text.splitlines()
                if x.startswith("sgl_router_pd_transfer_failures_total{")]
    assert failures == []


@pytest.fixture(scope="module")
def unified(pair) -> list:
    """The unified path's answers: the decode server serving the requests itself."""
    return outputs(pair.urls[1])


def test_pdserve_router_equals_unified(pair, router: EmbeddedRouter, unified: list) -> None:
    assert outputs(router.url) == unified
    assert all(unified)
    ttft = httpx.get(router.url + "/metrics").text
    assert "sgl_router_pd_ttft_seconds_count" in ttft


def test_sglang_router_in_front_of_pdserve_workers(pair, unified: list, unified_sampled: list) -> None:
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
        assert sampled_outputs(url, generate_batch=False) == unified_sampled[:3]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


LL_DOCS = [("The capital of France is", " Paris"), ("The capital of France is", " a city in Europe"),
           ("1, 2, 3, 4,", " 5"), ("Once upon a time", ", there was a princess."), ("def add(a, b):", "\n    return a + b")]


def hf_loglikelihoods(folder: Path) -> list[float]:
    """sum log p(continuation | context) from HF transformers' logits, split as lm-eval splits."""
    import torch
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_model

    tok, model, out = AutoTokenizer.from_pretrained(str(folder)), hf_model(folder), []
    for context, cont in LL_DOCS:
        whole = tok(context + cont, add_special_tokens=False).input_ids
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        out.append(sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
    return out


def lm_eval_loglikelihoods(base: str, folder: Path, tmp: Path) -> list[float]:
    """lm-eval-harness (local-completions) on a log-likelihood task defined from local files."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in LL_DOCS))
    (tmp / "pdserve_ll.yaml").write_text(
        "task: pdserve_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) +
        "\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n")
    args = (f"base_url={base}/v1/completions,model=default,tokenizer={folder},tokenizer_backend=huggingface,"
            "tokenized_requests=True,num_concurrent=1,max_retries=1,batch_size=2")
    res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["pdserve_ll"],
                                  task_manager=TaskManager(include_path=str(tmp)), log_samples=True)
    samples = sorted(res["samples"]["pdserve_ll"], key=lambda s: s["doc_id"])
    return [float(s["filtered_resps"][0][0]) for s in samples]


def test_lm_eval_loglikelihood_equals_hf_unified_and_pd(pair, router: EmbeddedRouter, bundled_model_dir: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref = hf_loglikelihoods(bundled_model_dir)
    for name, base in (("unified", pair.urls[1]), ("pd", router.url)):
        (tmp_path / name).mkdir()
        got = lm_eval_loglikelihoods(base, bundled_model_dir, tmp_path / name)
        assert len(got) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (name, got, ref)


def test_echo_logprobs_score_the_prompt_through_pd(pair, router: EmbeddedRouter) -> None:
    body = {"model": "default", "prompt": PROMPTS, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    for stream in (False, True):
        got = {}
        for base in (pair.urls[1], router.url):
            r = httpx.post(base + "/v1/completions", json={**body, "stream": stream}, timeout=120)
            assert r.status_code == 200, r.text
            if stream:
                lps: dict = {}
                for line in r.text.splitlines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            if ch["logprobs"]:
                                lps.setdefault(ch["index"], []).extend(ch["logprobs"]["token_logprobs"])
                got[base] = [lps[k] for k in sorted(lps)]
            else:
                got[base] = [c["logprobs"]["token_logprobs"] for c in r.json()["choices"]]
        uni, pd = got[pair.urls[1]], got[router.url]
        assert [x[0] for x in uni] == [None, None] and all(v is not None for x in uni for v in x[1:])
        assert [len(x) for x in pd] == [len(x) for x in uni]
        assert max(abs(a - b) for x, y in zip(uni, pd) for a, b in zip(x[1:], y[1:])) < 1e-4
    gen = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 2, "temperature": 0}, "return_logprob": True,
           "logprob_start_len": 0}
    uni = httpx.post(pair.urls[1] + "/generate", json=gen, timeout=120).json()["meta_info"]["input_token_logprobs"]
    pd = httpx.post(router.url + "/generate", json=gen, timeout=120).json()["meta_info"]["input_token_logprobs"]
    assert uni[0][0] is None and [x[1] for x in pd] == [x[1] for x in uni]
    assert max(abs(a[0] - b[0]) for a, b in zip(uni[1:], pd[1:])) < 1e-4
    # the router passes the tokenizer endpoints and model lookups through to a worker
    tok = {"prompt": PROMPTS[0]}
    assert httpx.post(router.url + "/tokenize", json=tok).json() == httpx.post(pair.urls[1] + "/tokenize", json=tok).json()
    assert httpx.get(router.url + "/v1/models/default").json()["id"] == "default"
    assert httpx.get(router.url + "/v1/models/gpt-4o").status_code == 404
    assert httpx.get(router.url + "/version").status_code == 200


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
