"""Servers of a DeepSeek-V3-shaped model (MLA + MoE: 16 routed experts, top-4 grouped routing, a
shared expert, a dense first layer) with expert parallelism under DP attention, unified and PD
(real processes, gloo all-to-all, tcp KV):

- EP 3 over 3 DP-attention ranks (16 experts: 5, 5, 6 per rank; each rank keeps its own
  requests' latents) equals HF transformers token for token; /server_info names the attention
  kind, the experts and the ep size; /get_load and /metrics count every routed pair per expert
  and per EP rank.
- PD with MLA: prefill tp 1 -> decode DP attention 2 (its sparse layers TP-MoE: every expert's
  I halved, each rank routing both ranks' gathered tokens) equals HF; the decode's two ranks
  took rooms; their routing counts add up to their own tokens' only.
- kill -9 one EP rank mid-request: the request ends with a clean error, the server exits
  non-zero, every rank process is gone (none hangs in an all-to-all) and a router ejects it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.hf_reference import hf_greedy
from tests.integration.conftest import ServerProcess, children_of
from tests.integration.pd_cluster import PDPair, clean_error, get_load, wait_for, wait_settled
from tests.integration.test_pd_server_faults import _in_background

ARGS = ["--threads", "1", "--num-pages", "160", "--page-size", "4", "--chunk-budget", "32", "--max-model-len", "512"]
EP3 = ["--dp-size", "3", "--tp-size", "3", "--enable-dp-attention", "--ep-size", "3"]
NEW = 8
PROMPTS = [[random.Random(i).randrange(3, 49000) for _ in range(random.Random(i).randint(2, 50))] for i in range(9)]


@pytest.fixture(scope="module")
def v3(moe_dir) -> Path:
    return moe_dir("deepseek_v3")


@pytest.fixture(scope="module")
def hf(v3: Path) -> list[list[int]]:
    return [hf_greedy(v3, p, NEW)[0] for p in PROMPTS]


def body(ids: list[int], new: int = NEW, rank: int | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0,
                                                                "ignore_eos": True}}
    if rank is not None:
        b["data_parallel_rank"] = rank
    return b


async def _all(url: str, bodies: list[dict[str, Any]]) -> list[list[int]]:
    async with httpx.AsyncClient() as client:
        async def one(b: dict[str, Any]) -> list[int]:
            r = await client.post(url + "/generate", json=b, timeout=180)
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]

        return list(await asyncio.gather(*(one(b) for b in bodies)))


@pytest.fixture(scope="module")
def ep3(tmp_path_factory: pytest.TempPathFactory, v3: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--model", str(v3), *ARGS, *EP3], tmp_path_factory.mktemp("ep3") / "server.log")
    try:
        server.wait_healthy()
        yield server
    except BaseException:
        print(server.log_tail(120))
        raise
    finally:
        server.stop()


def test_ep3_under_dp_attention_equals_hf(ep3: ServerProcess, hf: list[list[int]]) -> None:
    out = asyncio.run(_all(ep3.url, [body(p, rank=[0, 1, 2, None][i % 4]) for i, p in enumerate(PROMPTS)]))
    assert out == hf
    info = httpx.get(ep3.url + "/server_info", timeout=30).json()
    assert (info["attention_kind"], info["num_experts"], info["num_experts_per_tok"], info["ep_size"]) == \
        ("mla", 16, 4, 3)
    assert info["kv_bytes_per_token"] == 3 * (32 + 8) * 4  # 3 layers x one latent (c_kv 32 + k_pe 8), fp32
    load = get_load(ep3.url)
    moe = load["expert_load"]
    assert len(moe["layers"]) == 2 and len(moe["ep_ranks"]) == 3  # layers 1, 2 are sparse
    assert sum(moe["ep_ranks"]) == sum(moe["experts"]) == sum(map(sum, moe["layers"]))
    # every token of every rank routed to 4 experts in each sparse layer (warm-ups included)
    assert sum(moe["experts"]) % 8 == 0 and sum(moe["experts"]) >= 8 * sum(len(p) + NEW - 1 for p in PROMPTS)
    assert all(r["steps"] > 0 for r in load["dp_ranks"])
    metrics = httpx.get(ep3.url + "/metrics", timeout=30).text
    assert 'sglang:moe_ep_rank_routed_tokens_total{ep_rank="2"' in metrics
    assert "sglang:moe_ep_imbalance" in metrics
    settled = wait_settled(ep3.url, load["num_pages"])
    assert settled["integrity_errors"] == 0


def test_kill_one_ep_rank_mid_request(ep3: ServerProcess) -> None:
    """Last on this server: it takes it down. EP rank 2 dies while rank 1 decodes; every rank's
    step waits on rank 2 in the all-to-all, so the request cannot finish."""
    cfg = RouterConfig(port=0, policy=PolicyConfig("round_robin"), workers=(WorkerSpec(ep3.url, "regular"),),
                       health=HealthConfig(interval_s=0.3, timeout_s=2.0, failure_threshold=2))
    with EmbeddedRouter(cfg) as router:
        wait_for(lambda: all(w["healthy"] for w in httpx.get(router.url + "/workers").json()["workers"]), 10,
                 "the router to see the server healthy")
        ranks = get_load(ep3.url)["dp_ranks"]
        victim = ranks[2]["pid"]
        assert {r["pid"] for r in ranks} <= children_of(ep3.proc.pid)
        async def long_request() -> httpx.Response:
            async with httpx.AsyncClient() as client:
                return await client.post(router.url + "/generate", json=body(PROMPTS[0], 400, rank=1), timeout=120)

        fut = _in_background(long_request)
        wait_for(lambda: get_load(ep3.url)["dp_ranks"][1]["num_running_reqs"] > 0 or fut.done(), 30,
                 "rank 1 to decode")
        assert not fut.done()
        os.kill(victim, signal.SIGKILL)
        r = fut.result(120)
        assert r.status_code >= 500 and "error" in r.json(), r.text
        wait_for(lambda: ep3.proc.poll() is not None, 90, "the server to exit")
        assert ep3.proc.returncode != 0, ep3.log_tail()
        wait_for(lambda: not children_of(ep3.proc.pid), 30, "every EP rank to exit (none hangs)")
        wait_for(lambda: not httpx.get(f"{router.url}/workers/{ep3.url}").json()["healthy"], 10,
                 "the router to eject the server")


def test_pd_mla_prefill_tp1_decode_dp_attention_2_equals_hf(tmp_path: Path, v3: Path, hf: list[list[int]]) -> None:
    env = {"PDSERVE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1.0", "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "20"}
    pair = PDPair(tmp_path, "tcp", ["--model", str(v3), *ARGS], prefill_env=env, decode_env=env)
    try:
        pair.launch_prefill()
        pair.launch_decode(["--dp-size", "2", "--tp-size", "2", "--enable-dp-attention"])
        pair.wait_healthy()
        pair.mark()
        results = pair.many([("/generate", body(p), False) for p in PROMPTS], concurrency=4)
        for i, res in enumerate(results):
            assert res.prefill.ok and res.decode.ok, (res.prefill.describe(), res.decode.describe())
            assert res.decode.json["output_ids"] == hf[i], i
        decode = get_load(pair.decode.url)  # type: ignore[union-attr]
        moved = [r["kv_transfers"]["success"] for r in decode["dp_ranks"]]
        assert sum(moved) == len(PROMPTS) and min(moved) > 0  # both DP-attention ranks took rooms
        routed = decode["expert_load"]
        assert len(routed["ep_ranks"]) == 1 and sum(routed["experts"]) % 8 == 0  # 4 pairs x 2 sparse layers a token
        # each rank counted only its own tokens (not the gathered padding or the other rank's): the
        # decode computed every prompt's first token on the prefill, then NEW - 1 tokens per request
        assert sum(routed["experts"]) < 8 * (len(PROMPTS) * NEW + 16)
        pair.settled()
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.stop()
