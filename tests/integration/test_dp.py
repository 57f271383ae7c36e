"""Data parallelism (`--dp-size`) and DP attention (`--tp-size 2 --dp-size 2 --enable-dp-attention`),
unified and PD, on the tiny random Llama (real processes, gloo collectives, tcp KV).

- Greedy output of a dp-2 server (replicas, and DP attention) equals HF transformers token for
  token on 22 prompts spread over both ranks (data_parallel_rank and the balancer), plus 4 long
  decode streams on rank 1 running while a 600-token prompt prefills on rank 0 (the ranks in
  different phases, asserted from the step traces, which DP attention keeps aligned round by
  round) and rounds where one rank only joins the other's collectives (idle forwards).
  Every rank's pool is back at its mark and its integrity checks clean.
- PD, prefill dp 2 + decode dp 2 with DP attention: equal to HF; each room's KV left prefill
  dp rank room % 2 (the per-rank transfer counters); the same through SGLang's router.
- kill -9 one dp rank of the decode: the server answers 503 and exits non-zero, no rank hangs,
  a router ejects it, the paired prefill's pool returns to idle.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.hf_reference import hf_greedy
from tests.integration.conftest import ServerProcess, children_of, free_port
from tests.integration.pd_cluster import PDPair, clean_error, get_load, healthy, new_room, wait_for, wait_settled
from tests.integration.test_pd_server_faults import _in_background
from tests.integration.test_pd_engines import prompts

ARGS = ["--threads", "1", "--num-pages", "400", "--page-size", "16", "--chunk-budget", "32", "--max-model-len", "1024"]
DP_ATTENTION = ["--dp-size", "2", "--tp-size", "2", "--enable-dp-attention"]
PROMPTS = prompts(22, seed=13)
SHORT_NEW, LONG_NEW = 8, 120  # rank 1 decodes for ~120 rounds: a window no poll misses
STREAMS = prompts(4, seed=14)  # rank 1's decode streams
LONG = [random.Random(15).randrange(300, 40000) for _ in range(600)]  # rank 0's prefill (19 chunks of 32)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> dict[str, list[list[int]]]:
    return {"short": [hf_greedy(tiny_model_dir, p, SHORT_NEW)[0] for p in PROMPTS],
            "streams": [hf_greedy(tiny_model_dir, p, LONG_NEW)[0] for p in STREAMS],
            "long": hf_greedy(tiny_model_dir, LONG, SHORT_NEW)[0]}


def body(ids: list[int], new: int, rank: int | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0,
                                                                "ignore_eos": True}}
    if rank is not None:
        b["data_parallel_rank"] = rank
    return b


async def _post(client: httpx.AsyncClient, url: str, b: dict[str, Any]) -> list[int]:
    r = await client.post(url + "/generate", json=b, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


async def _workload(url: str, pd: PDPair | None = None) -> dict[str, Any]:
    """The 22 short prompts (c 8; ranks 0, 1 and the balancer in turn), then rank 1's 4 streams
    with rank 0's long prompt sent once they decode. `pd`: send each body to both sides."""
    async with httpx.AsyncClient() as client:
        async def one(b: dict[str, Any]) -> list[int]:
            if pd is None:
                return await _post(client, url, b)
            res = await pd.send_both(pd.pd_body(b))
            assert res.decode.status == 200 and res.prefill.status == 200, res.decode.describe()
            return res.decode.json["output_ids"]

        sem = asyncio.Semaphore(8)

        async def limited(b: dict[str, Any]) -> list[int]:
            async with sem:
                return await one(b)

        short = await asyncio.gather(*(limited(body(p, SHORT_NEW, [0, 1, None][i % 3])) for i, p in enumerate(PROMPTS)))
        streams = [asyncio.ensure_future(one(body(p, LONG_NEW, 1))) for p in STREAMS]
        target = url if pd is None else pd.decode.url  # type: ignore[union-attr]
        await asyncio.to_thread(wait_for, lambda: get_load(target)["dp_ranks"][1]["num_running_reqs"] == 4, 60,
                                "rank 1's streams to decode")
        long = await one(body(LONG, SHORT_NEW, 0))
        return {"short": short, "streams": await asyncio.gather(*streams), "long": long}


def _different_phases(load: dict[str, Any]) -> tuple[bool, bool]:
    """(a round where rank 0 ran a prefill chunk while rank 1 only decoded, a round where one
    rank only joined the other's collectives), from the two ranks' aligned step traces."""
    r0, r1 = (x["step_trace"] for x in load["dp_ranks"])
    assert len(r0) == len(r1), "DP attention ranks must have run the same rounds"
    mixed = any(a[2] >= 32 and 1 <= b[2] <= 4 and not b[3] for a, b in zip(r0, r1))
    idle = any(a[3] != b[3] for a, b in zip(r0, r1))
    return mixed, idle


def _settled(url: str) -> None:
    load = wait_settled(url, get_load(url)["num_pages"])  # free + cached == the whole pool, nothing in flight
    assert load["integrity_errors"] == 0
    for rank in load["dp_ranks"]:
        assert rank["num_running_reqs"] == rank["num_waiting_reqs"] == 0


@pytest.mark.parametrize("mode", ["replicas", "dp_attention"])
def test_dp_server_equals_hf(mode: str, tmp_path: Path, tiny_model_dir: Path, hf: dict[str, Any]) -> None:
    extra = ["--dp-size", "2"] if mode == "replicas" else DP_ATTENTION
    server = ServerProcess(["--model", str(tiny_model_dir), *ARGS, *extra], tmp_path / "server.log")
    try:
        server.wait_healthy()
        out = asyncio.run(_workload(server.url))
        assert out == hf
        load = httpx.get(server.url + "/get_load", params={"step_trace": 1}, timeout=30).json()
        assert load["dp_size"] == 2 and all(r["steps"] > 0 for r in load["dp_ranks"])
        if mode == "dp_attention":
            assert _different_phases(load) == (True, True)
            assert all(r["idle_steps"] > 0 for r in load["dp_ranks"])
            metrics = httpx.get(server.url + "/metrics", timeout=30).text
            assert 'sglang:dp_idle_steps_total{dp_rank="1",model_name=' in metrics or \
                'sglang:dp_idle_steps_total{model_name="' in metrics
        else:
            assert all(r["idle_steps"] == 0 for r in load["dp_ranks"])
        _settled(server.url)
        bad = httpx.post(server.url + "/generate", json=body(PROMPTS[0], 2, 2), timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "data_parallel_rank"
    except BaseException:
        print(server.log_tail(120))
        raise
    finally:
        server.proc.terminate()
        server.proc.wait(30)


@pytest.fixture(scope="module")
def pd_pair(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[PDPair]:
    env = {"PDSERVE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1.0", "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "10"}
    pair = PDPair(tmp_path_factory.mktemp("pd-dp"), "tcp", ["--model", str(tiny_model_dir), *ARGS],
                  prefill_env=env, decode_env=env)
    try:
        pair.launch_prefill(["--dp-size", "2"])
        pair.launch_decode(DP_ATTENTION)
        pair.wait_healthy()
        pair.mark()
        yield pair
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.stop()


def test_pd_prefill_dp2_decode_dp_attention_equals_hf(pd_pair: PDPair, hf: dict[str, Any]) -> None:
    out = asyncio.run(_workload(pd_pair.decode.url, pd_pair))  # type: ignore[union-attr]
    assert out == hf
    rooms = [new_room() for _ in range(8)]
    for room in rooms:
        res = pd_pair.request("/generate", body(PROMPTS[room % len(PROMPTS)], SHORT_NEW), room=room)
        assert res.decode.json["output_ids"] == hf["short"][room % len(PROMPTS)]
    prefill = get_load(pd_pair.prefill.url)  # type: ignore[union-attr]
    sent = [r["kv_transfers"]["success"] for r in prefill["dp_ranks"]]
    before = len(PROMPTS) + len(STREAMS) + 1  # the workload's rooms (random): only their total is known
    assert sum(sent) == before + len(rooms)
    # the 8 known rooms: send 4 more with rooms of one parity each and watch the counters move
    for parity in (0, 1):
        start = [r["kv_transfers"]["success"] for r in get_load(pd_pair.prefill.url)["dp_ranks"]]  # type: ignore
        for k in range(2):
            room = (new_room() & ~1) | parity
            pd_pair.request("/generate", body(PROMPTS[k], SHORT_NEW), room=room)
        end = [r["kv_transfers"]["success"] for r in get_load(pd_pair.prefill.url)["dp_ranks"]]  # type: ignore
        assert [e - s for e, s in zip(end, start)] == ([2, 0] if parity == 0 else [0, 2])
    for server in (pd_pair.prefill, pd_pair.decode):
        _settled(server.url)  # type: ignore[union-attr]


def test_sglang_router_in_front_of_dp_servers(pd_pair: PDPair, hf: dict[str, Any]) -> None:
    pytest.importorskip("sglang_router")
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--prefill",
           pd_pair.prefill.url, str(pd_pair.bootstrap_port), "--decode", pd_pair.decode.url,  # type: ignore
           "--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1", "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.post(url + "/generate", json=body(PROMPTS[0], 1), timeout=30).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lambda: proc.poll() is not None or up(), 90, "sglang-router")
        assert proc.poll() is None
        for i in range(6):
            r = httpx.post(url + "/generate", json=body(PROMPTS[i], SHORT_NEW), timeout=120)
            assert r.status_code == 200 and r.json()["output_ids"] == hf["short"][i], r.text
    finally:
        proc.terminate()
        proc.wait(15)
    for server in (pd_pair.prefill, pd_pair.decode):
        _settled(server.url)  # type: ignore[union-attr]


def _holds(url: str, rank: int) -> bool:
    r = get_load(url)["dp_ranks"][rank]
    return r["num_running_reqs"] + r["num_waiting_reqs"] > 0


def test_kill_one_decode_dp_rank(pd_pair: PDPair) -> None:
    """Last in the module: it takes the decode down. Dp rank 1 dies while a long prompt's KV
    moves into it."""
    decode, prefill = pd_pair.decode, pd_pair.prefill
    assert decode is not None and prefill is not None
    cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("round_robin"),
                       workers=(WorkerSpec(prefill.url, "prefill", pd_pair.bootstrap_port), WorkerSpec(decode.url, "decode")),
                       health=HealthConfig(interval_s=0.3, timeout_s=2.0, failure_threshold=2))
    with EmbeddedRouter(cfg) as router:
        wait_for(lambda: all(w["healthy"] for w in httpx.get(router.url + "/workers").json()["workers"]), 10,
                 "the router to see both workers healthy")
        victim = get_load(decode.url)["dp_ranks"][1]["pid"]
        assert victim in children_of(decode.proc.pid)
        fut = _in_background(lambda: pd_pair.send_both(pd_pair.pd_body(body(LONG, 200, 1)), timeout=60))
        wait_for(lambda: _holds(decode.url, 1) or fut.done(), 30, "decode rank 1 to take the request")
        assert not fut.done(), fut.result().decode.describe()
        os.kill(victim, signal.SIGKILL)
        res = fut.result(60)
        assert res.decode.status is None or clean_error(res.decode), res.decode.describe()
        # its room failed with the decode rank, or its KV had already left
        assert res.prefill.status == 200 or clean_error(res.prefill), res.prefill.describe()
        try:
            r = httpx.post(decode.url + "/generate", json=body(PROMPTS[0], 4), timeout=30)
            assert r.status_code == 503, r.text
        except httpx.HTTPError:
            pass  # already gone
        wait_for(lambda: decode.proc.poll() is not None, 60, "the decode server to exit")
        assert decode.proc.returncode != 0, decode.log_tail()
        wait_for(lambda: not children_of(decode.proc.pid), 30, "every dp rank to exit (none hangs)")
        wait_for(lambda: not httpx.get(f"{router.url}/workers/{decode.url}").json()["healthy"], 10,
                 "the router to eject the decode")
    assert healthy(prefill.url)
    wait_settled(prefill.url, pd_pair.marks["prefill"])
