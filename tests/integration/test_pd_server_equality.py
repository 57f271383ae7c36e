"""PD through real servers equals the unified engine, token for token (issue 4, "What must hold").

One module, two pairs started one after the other (module fixture parametrized by backend: tcp,
then shm). Each pair runs 20 prompts greedily through prefill + decode, non-streaming and
streaming on /generate (output ids compared token for token), plus /v1/completions and
/v1/chat/completions (text compared), against the in-process `pdserve.LLM` with the same engine
settings (the unified reference). The set covers prompts longer than the chunk budget (64
tokens here: up to 6 chunks, KV pushed after each) and prefill-side prefix-cache hits (a long
shared prefix: later family members must report `cached_tokens` on the prefill and carry the
same count through the metadata record to the decode). Afterwards both servers are healthy,
idle, and their pools hold as many free + cached pages as at the start.

The KV bytes decode receives equal the prefill's for those pages: asserted at engine level in
tests/integration/test_pd_engines.py::test_decode_kv_bytes_equal_prefill_pages (and every
backend's byte exactness in test_transfer_backends.py); here the proof is the equal output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve import SamplingParams
from tests.integration.pd_cluster import PDPair, PDResult, running_pair

PAGE = 16
CHUNK = 64
MAX_NEW = 8
CONCURRENCY = 8
ENGINE_ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "600",
               "--page-size", str(PAGE), "--chunk-budget", str(CHUNK), "--seed", "0", "--max-tokens-cap", "512"]
ENGINE_KWARGS: dict[str, Any] = {"max_model_len": 1024, "num_pages": 600, "page_size": PAGE,
                                 "chunk_budget": CHUNK, "seed": 0, "threads": 1}

SHORT = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a", "List three colors:",
         "Water boils at", "The quick brown fox", "import numpy as np\n", "My favourite book is",
         "In 1969, astronauts", "The best way to learn a language is"]
ANIMALS = ["cat", "dog", "owl", "fox", "bee", "elk", "yak", "ant"]


def _long_text(n: int, seed: int) -> str:
    return " ".join(f"Line {i}: the {ANIMALS[(i * seed) % 8]} met the {ANIMALS[(i + seed) % 8]} near "
                    f"house {i * 7 + seed}." for i in range(n))


PREFIX = ("You are a careful assistant. Read the log below and answer the question at the end.\n"
          + _long_text(8, 5) + "\n")
SUFFIXES = ["Question: which animal came first?", "Question: how many lines are there?",
            "Question: which house number is the largest?", "Question: name two animals.",
            "Question: summarise the log.", "Question: what is line 3 about?"]
CHAT = [{"role": "user", "content": "Name a planet in our solar system."}]


@pytest.fixture(scope="module")
def reference(bundled_model_dir: Path) -> Any:
    """The unified engine (same settings as the servers) in this process."""
    from pdserve import LLM

    return LLM("default", **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def prompts(reference: Any) -> dict[str, list[list[int]]]:
    enc = reference.tokenizer.encode
    prefix = enc(PREFIX)
    out = {
        "short": [enc(t) for t in SHORT],
        "long": [enc(_long_text(n, s)) for n, s in ((5, 1), (9, 2), (14, 3), (22, 4))],
        "family": [prefix + enc(s) for s in SUFFIXES],
        "prefix": [prefix],
    }
    assert all(len(p) > CHUNK for p in out["long"] + out["family"])
    assert max(len(p) for p in out["long"]) > 5 * CHUNK
    assert len(out["short"]) + len(out["long"]) + len(out["family"]) >= 20
    return out


def _params() -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)


@pytest.fixture(scope="module")
def expected(reference: Any, prompts: dict[str, list[list[int]]]) -> dict[tuple[int, ...], Any]:
    every = prompts["short"] + prompts["long"] + prompts["family"]
    chat_ids = reference.tokenizer.apply_chat_template(CHAT)
    outs = reference.generate(every + [chat_ids], _params(), use_tqdm=False)
    return {tuple(p): o for p, o in zip(every + [chat_ids], outs)}


@pytest.fixture(scope="module", params=["tcp", "shm", "nixl", "mooncake"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         bundled_model_dir: Path) -> Iterator[PDPair]:
    with running_pair(tmp_path_factory.mktemp(f"pd-{request.param}"), request.param, ENGINE_ARGS) as p:
        yield p


def _gen_body(ids: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}


def _check_native(res: PDResult, ids: list[int], ref: Any, pair: PDPair) -> dict[str, Any]:
    """Prefill answered the first token, decode the whole greedy output; returns prefill's meta."""
    assert res.prefill.ok, res.prefill.describe() + "\n" + pair.logs()
    assert res.decode.ok, res.decode.describe() + "\n" + pair.logs()
    pre, dec = res.prefill.final, res.decode.final
    assert pre["output_ids"] == ref.output_ids[:1], (pre, ref.output_ids)
    assert pre["meta_info"]["completion_tokens"] == 1
    assert dec["output_ids"] == ref.output_ids, (len(ids), dec["output_ids"], ref.output_ids)
    assert dec["meta_info"]["finish_reason"]["type"] == ref.finish_reason
    assert dec["meta_info"]["prompt_tokens"] == len(ids) == pre["meta_info"]["prompt_tokens"]
    assert dec["meta_info"]["completion_tokens"] == len(ref.output_ids)
    # the metadata record carries the prefill's prefix-cache hit to the decode
    assert dec["meta_info"]["cached_tokens"] == pre["meta_info"]["cached_tokens"]
    return pre["meta_info"]


def test_server_info_reports_disaggregation(pair: PDPair) -> None:
    for url, mode in ((pair.prefill.url, "prefill"), (pair.decode.url, "decode")):
        info = httpx.get(f"{url}/server_info", timeout=10).json()
        assert info["disaggregation_mode"] == mode
        assert info["disaggregation_transfer_backend"] == pair.backend
        assert info["disaggregation"]["mode"] == mode and info["disaggregation"]["backend"] == pair.backend
        assert "cluster_token" not in info["disaggregation"]
    pre_info = httpx.get(f"{pair.prefill.url}/server_info", timeout=10).json()
    assert pre_info["disaggregation_bootstrap_port"] == pair.bootstrap_port


def test_greedy_equals_unified_non_streaming(pair: PDPair, prompts: dict[str, list[list[int]]],
                                            expected: dict[tuple[int, ...], Any]) -> None:
    # round 1: every prompt but the later prefix-family members (the first one fills the cache)
    first = prompts["short"] + prompts["long"] + prompts["family"][:1]
    results = pair.many([("/generate", _gen_body(ids), False) for ids in first], CONCURRENCY)
    for ids, res in zip(first, results):
        _check_native(res, ids, expected[tuple(ids)], pair)
    # round 2: the rest of the family reuses the shared prefix on the prefill side
    rest = prompts["family"][1:]
    results = pair.many([("/generate", _gen_body(ids), False) for ids in rest], CONCURRENCY)
    want_cached = len(prompts["prefix"][0]) // PAGE * PAGE
    for ids, res in zip(rest, results):
        meta = _check_native(res, ids, expected[tuple(ids)], pair)
        assert meta["cached_tokens"] >= want_cached, (meta, want_cached)


def test_greedy_equals_unified_streaming(pair: PDPair, prompts: dict[str, list[list[int]]],
                                        expected: dict[tuple[int, ...], Any]) -> None:
    every = prompts["short"] + prompts["long"] + prompts["family"]
    results = pair.many([("/generate", _gen_body(ids), True) for ids in every], CONCURRENCY)
    for ids, res in zip(every, results):
        assert res.decode.done and res.prefill.done, (res.prefill.describe(), res.decode.describe())
        _check_native(res, ids, expected[tuple(ids)], pair)
        # streamed ids grow monotonically and the last frame holds them all
        seen = [ev["output_ids"] for ev in res.decode.events]
        assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))


def _openai_text(reply: Any, chat: bool) -> tuple[str, str | None]:
    if reply.events:
        text, finish = "", None
        for ev in reply.events:
            for c in ev.get("choices", []):
                text += (c.get("delta", {}).get("content") or "") if chat else c.get("text", "")
                finish = c.get("finish_reason") or finish
        return text, finish
    c = reply.json["choices"][0]
    return (c["message"]["content"] if chat else c["text"]), c["finish_reason"]


def test_openai_endpoints_equal_unified(pair: PDPair, prompts: dict[str, list[list[int]]],
                                        expected: dict[tuple[int, ...], Any], reference: Any) -> None:
    short, long = prompts["short"][0], prompts["long"][1]
    chat_ids = tuple(reference.tokenizer.apply_chat_template(CHAT))
    comp = {"model": "default", "max_tokens": MAX_NEW, "temperature": 0}
    chat = {"model": "default", "messages": CHAT, "max_tokens": MAX_NEW, "temperature": 0}
    items = [("/v1/completions", {**comp, "prompt": short}, False), ("/v1/completions", {**comp, "prompt": long}, True),
             ("/v1/chat/completions", chat, False), ("/v1/chat/completions", chat, True)]
    refs = [expected[tuple(short)], expected[tuple(long)], expected[chat_ids], expected[chat_ids]]
    results = pair.many(items, CONCURRENCY)
    for (path, _, stream), ref, res in zip(items, refs, results):
        assert res.prefill.ok, res.prefill.describe()
        assert res.decode.ok, res.decode.describe()
        is_chat = "chat" in path
        text, finish = _openai_text(res.decode, is_chat)
        assert text == ref.text, (path, stream, text, ref.text)
        assert finish == ref.finish_reason
        if not stream:
            assert res.decode.json["usage"]["completion_tokens"] == len(ref.output_ids)
            assert res.prefill.json["usage"]["completion_tokens"] == 1


def test_pools_back_and_servers_healthy(pair: PDPair) -> None:
    pair.settled()


def test_metrics_report_transfers(pair: PDPair) -> None:
    """After the equality tests, both sides' /metrics count the successful transfers and bytes."""
    for url in (pair.prefill.url, pair.decode.url):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        ok = [line for line in text.splitlines() if line.startswith("sglang:kv_transfers_total{") and 'result="success"' in line]
        assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 20, ok
        nbytes = [line for line in text.splitlines() if line.startswith("sglang:kv_transfer_bytes_total{")]
        assert nbytes and float(nbytes[0].rsplit(" ", 1)[1]) > 0
        for name in ("kv_transfers", "kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_recomputed"):
            assert f"# TYPE sglang:{name}_total counter" in text, name  # cumulative figures are counters
