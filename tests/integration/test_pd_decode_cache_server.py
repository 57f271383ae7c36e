"""Decode-side prefix cache through real servers and the router: a prefill server, a decode
server with --disaggregation-decode-enable-radix-cache, an embedded router in front. A 4-turn
conversation (tiny model): each turn's usage reports cached_tokens = the decode's hit (the
previous turn's prompt and answer, whole pages), the decode's sglang:kv_transfer_bytes_total
grows by the uncached pages only, output equals the unified engine, pools settle at their marks."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.engine import Engine
from pdserve.engine.kv_cache import pages_needed
from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.pd_cluster import PDPair, wait_for
from tests.integration.test_pd_decode_cache import NEW, PARAMS, PS, unified_answer
from tests.integration.test_pd_engines import engine_cfg

FLAG = "--disaggregation-decode-enable-radix-cache"


def transfer_bytes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "sglang:kv_transfer_bytes_total")


def test_router_multi_turn_usage_and_bytes(tmp_path: Path, tiny_model_dir: Path) -> None:
    uni = Engine.build(engine_cfg(tiny_model_dir))
    page_bytes = uni.pool.page_bytes()
    args = ["--model", str(tiny_model_dir), "--threads", "1", "--num-pages", "200", "--page-size", str(PS),
            "--chunk-budget", "24", "--skip-server-warmup"]
    pair = PDPair(tmp_path, "tcp", args)
    try:
        pair.launch_prefill()
        pair.launch_decode([FLAG])
        pair.wait_healthy()
        pair.mark()
        assert pair.decode is not None and pair.prefill is not None
        info = [httpx.get(f"{u}/server_info", timeout=10).json() for u in (pair.prefill.url, pair.decode.url)]
        assert [i["disaggregation_decode_enable_radix_cache"] for i in info] == [False, True]
        cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("round_robin"),
                           workers=(WorkerSpec(pair.prefill.url, "prefill", pair.bootstrap_port),
                                    WorkerSpec(pair.decode.url, "decode")),
                           health=HealthConfig(interval_s=0.3, timeout_s=2.0, failure_threshold=2))
        rng = random.Random(4)
        history = [rng.randrange(3, 49000) for _ in range(25)]  # the system prompt
        with EmbeddedRouter(cfg) as router:
            wait_for(lambda: all(w["healthy"] for w in httpx.get(router.url + "/workers").json()["workers"]),
                     10, "the router to see both workers healthy")
            cached = 0  # tokens the decode's cache holds of this conversation
            for k in range(4):
                prompt = history + [rng.randrange(3, 49000) for _ in range(rng.randint(3, 9))]
                ref = unified_answer(uni, f"s{k}", prompt)
                before = transfer_bytes(pair.decode.url)
                sp = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True}
                if k % 2:  # OpenAI usage
                    r = httpx.post(router.url + "/v1/completions", json={"prompt": prompt, **sp}, timeout=60)
                    assert r.status_code == 200, r.text
                    got_cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    answer = ref  # text only: the next turn goes on from the reference ids
                else:  # native: ids and meta_info
                    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": NEW, "temperature": 0,
                                                                     "ignore_eos": True}}
                    r = httpx.post(router.url + "/generate", json=body, timeout=60)
                    assert r.status_code == 200, r.text
                    answer, got_cached = r.json()["output_ids"], r.json()["meta_info"]["cached_tokens"]
                    assert answer == ref, k
                assert got_cached == cached, k  # the decode's hit beats the prefill's (answers cached too)
                moved = (pages_needed(len(prompt), PS) - cached // PS) * page_bytes
                wait_for(lambda: transfer_bytes(pair.decode.url) - before == moved, 10,
                         f"turn {k}: decode counts {moved} bytes")
                history = prompt + answer
                cached = (len(prompt) + NEW - 1) // PS * PS
        pair.settled()
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.stop()
        uni.close()

